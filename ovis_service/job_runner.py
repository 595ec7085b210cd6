"""The job runner: moves async jobs from the store onto idle inference threads, and their
images, progress and outcome back into the store.

It runs on the event loop beside the handlers. It claims a job only when an inference thread
sits idle with nothing queued for it, so a synchronous request, where someone is waiting, never
queues behind the backlog. Each replica sharing a PostgreSQL store runs one; whichever has an
idle thread takes the next job. A replica renews its claim on its running jobs every few
seconds; a claim left unrenewed for OVIS_JOB_LEASE seconds (the replica died) goes back to the
queue.
"""

import asyncio
import os
import socket
import time
from collections.abc import Callable
from contextlib import suppress

import structlog
from sqlalchemy.exc import SQLAlchemyError

from ovis_service.config import Settings
from ovis_service.errors import (
    GenerationFailedError,
    JobCancelledError,
    NotReadyError,
    ServiceError,
    ShuttingDownError,
)
from ovis_service.generation import (
    EncodedImage,
    Generation,
    ImageDone,
    StepDone,
    encoding_for,
    finish_image,
    submit,
)
from ovis_service.imaging import MEDIA_TYPES, ImageFormat
from ovis_service.schemas import GenerationParams
from ovis_service.store.job_store import JobStore
from ovis_service.store.records import JobRecord, JobStatus, NewImage, WebhookStatus
from ovis_service.webhooks import WebhookSender
from ovis_service.worker.pool import InferencePool

logger = structlog.get_logger(__name__)

_POLL_SECONDS = 0.25  # how often an idle thread looks for queued jobs
_HEARTBEAT_SECONDS = 2.0
_PURGE_SECONDS = 60.0
_PROGRESS_WRITE_SECONDS = 0.25  # progress is written at most this often per job, and at the end

Progress = tuple[int, int]  # (steps done, total steps) over all of a job's images
# What listeners hear: each step, then None once the job's outcome is in the store.
Heard = Progress | None


def replica_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def job_params(record: JobRecord) -> list[GenerationParams]:
    return [GenerationParams(**params) for params in record.request["params"]]


def image_files(encoded: list[EncodedImage], image_format: ImageFormat) -> list[NewImage]:
    """A request's finished images as the store keeps them, in request order."""
    return [
        NewImage(
            index=image.index,
            seed=image.params.seed,
            image_format=image_format,
            media_type=MEDIA_TYPES[image_format],
            data=image.data,
        )
        for image in sorted(encoded, key=lambda image: image.index)
    ]


class JobRunner:
    def __init__(
        self,
        store: JobStore,
        worker: InferencePool,
        settings: Settings,
        *,
        render: Callable[[JobRecord], bytes],
        webhooks: WebhookSender | None = None,
        replica: str | None = None,
        shared: bool = False,
    ) -> None:
        self.store = store
        self.replica = replica or replica_name()
        self._worker = worker
        self._settings = settings
        self._render = render  # the job as JSON, for webhooks
        self.webhooks = webhooks  # set before `start`
        self._shared = shared  # other replicas use the store: leases decide who runs what
        self._wake = asyncio.Event()
        self._stopping = False
        self._loops: list[asyncio.Task[None]] = []
        self._running: dict[str, Generation] = {}
        self._job_tasks: set[asyncio.Task[None]] = set()
        self._deliveries: set[asyncio.Task[None]] = set()
        self._delivering: set[str] = set()  # jobs whose webhook is being sent by this replica
        self._cancelled: set[str] = set()  # running here, asked to stop
        self._listeners: dict[str, set[asyncio.Queue[Heard]]] = {}

    # -- lifecycle, on the event loop ------------------------------------------------------------

    async def start(self) -> None:
        if not self._shared:
            # SQLite is one process's store: whatever it left running died with it.
            requeued = await asyncio.to_thread(self.store.requeue_stale, float("inf"))
            if requeued:
                logger.info("jobs_requeued", jobs=requeued, reason="previous run ended")
        for record in await asyncio.to_thread(self.store.webhooks_pending):
            self._send_webhook(record)
        self._loops = [
            asyncio.create_task(self._dispatch(), name="job-dispatch"),
            asyncio.create_task(self._maintain(), name="job-maintenance"),
        ]

    def stop_claiming(self) -> None:
        self._stopping = True
        self._wake.set()

    async def stop(self, timeout: float) -> None:
        """Stop claiming, let running jobs end (the pool's drain decides how), and hand back
        any still running after `timeout`; they run again at the next start."""
        self.stop_claiming()
        if self._job_tasks:
            await asyncio.wait(set(self._job_tasks), timeout=timeout)
        for job_id, generation in list(self._running.items()):
            generation.cancel()
            await asyncio.to_thread(self.store.release, job_id, self.replica)
        for task in [*self._loops, *self._job_tasks]:
            task.cancel()
        for task in [*self._loops, *self._job_tasks]:
            with suppress(asyncio.CancelledError):
                await task
        if self._deliveries:
            # A webhook still retrying stays pending in the store and is sent at next start.
            await asyncio.wait(set(self._deliveries), timeout=1.0)
            for task in self._deliveries:
                task.cancel()
        if self.webhooks is not None:
            await self.webhooks.aclose()

    # -- used by handlers ------------------------------------------------------------------------

    def wake(self) -> None:
        """A job was queued: look for an idle thread now rather than at the next poll."""
        self._wake.set()

    def cancel_here(self, job_id: str) -> None:
        """Stop the job at its next step if it runs on this replica (others see the request
        at their next heartbeat)."""
        generation = self._running.get(job_id)
        if generation is not None:
            self._cancelled.add(job_id)
            generation.cancel()

    def finished_elsewhere(self, record: JobRecord) -> None:
        """A handler finished the job (cancelled while queued): its webhook still goes out."""
        if record.status.finished and record.webhook_status is WebhookStatus.PENDING:
            self._send_webhook(record)

    def listen(self, job_id: str) -> asyncio.Queue[Heard]:
        """Each step of `job_id` while it runs on this replica, as it happens, then None once
        its outcome is stored."""
        queue: asyncio.Queue[Heard] = asyncio.Queue()
        self._listeners.setdefault(job_id, set()).add(queue)
        return queue

    def unlisten(self, job_id: str, queue: asyncio.Queue[Heard]) -> None:
        listeners = self._listeners.get(job_id)
        if listeners is not None:
            listeners.discard(queue)
            if not listeners:
                del self._listeners[job_id]

    # -- the loops -------------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        while not self._stopping:
            with suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=_POLL_SECONDS)
            self._wake.clear()
            try:
                while not self._stopping and self._worker.idle_threads() > 0:
                    record = await asyncio.to_thread(self.store.claim_next, self.replica)
                    if record is None or not await self._start(record):
                        break
            except Exception:
                # The loop must outlive anything: a store that is down, a row it cannot read.
                logger.exception("job_dispatch_failed")
                await asyncio.sleep(1.0)

    async def _start(self, record: JobRecord) -> bool:
        params = job_params(record)
        if len(params) > self._worker.places:
            # Accepted by a replica with more places, or before OVIS_QUEUE_SIZE was lowered:
            # it could never start here, and must not hold up the jobs behind it.
            await self._finish(
                record,
                JobStatus.FAILED,
                f"this replica runs at most {self._worker.places} images at once; "
                f"the job asks for {len(params)}",
                "too_many_images",
            )
            return True
        try:
            generation = submit(
                self._worker,
                params,
                request_id=record.id,
                timeout=self._settings.request_timeout,
                watch=True,
            )
        except ServiceError as exc:
            # A synchronous request took the idle thread first, or the pool stopped taking
            # work: the job goes back to its place in the queue.
            logger.info("job_released", job_id=record.id, reason=exc.detail)
            await asyncio.to_thread(self.store.release, record.id, self.replica)
            return False
        self._running[record.id] = generation
        task = asyncio.create_task(self._run(record, generation), name=f"job-{record.id}")
        self._job_tasks.add(task)
        task.add_done_callback(self._job_tasks.discard)
        return True

    async def _maintain(self) -> None:
        last_purge = 0.0
        while True:
            await asyncio.sleep(_HEARTBEAT_SECONDS)
            try:
                stop = await asyncio.to_thread(
                    self.store.heartbeat, self.replica, list(self._running)
                )
                for job_id in stop:
                    self.cancel_here(job_id)
                # A replica that died, or a job whose last write failed here, left it running.
                requeued = await asyncio.to_thread(
                    self.store.requeue_stale, self.store.clock() - self._settings.job_lease
                )
                if requeued:
                    logger.warning("jobs_requeued", jobs=requeued, reason="lease expired")
                    self.wake()
                if time.monotonic() - last_purge > _PURGE_SECONDS:
                    last_purge = time.monotonic()
                    purged = await asyncio.to_thread(self.store.purge_expired)
                    if purged:
                        logger.info("jobs_expired", count=purged)
            except Exception:
                logger.exception("job_maintenance_failed")

    # -- one job ---------------------------------------------------------------------------------

    async def _run(self, record: JobRecord, generation: Generation) -> None:
        structlog.contextvars.bind_contextvars(request_id=record.id, job_id=record.id)
        params = generation.params
        image_format: ImageFormat = record.request.get("format", "png")
        encoding = encoding_for(
            self._worker, self._settings, image_format, record.request.get("quality")
        )
        log_fields: dict[str, object] = {"request_id": record.id, "job_id": record.id}
        steps = [(0, p.num_inference_steps) for p in params]
        last_write = 0.0
        encoded: list[EncodedImage] = []
        logger.info("job_started", images=len(params), replica=self.replica)
        try:
            async for event in generation.stream():
                if isinstance(event, StepDone):
                    steps[event.index] = (event.steps_done, event.total)
                    progress = (sum(s for s, _ in steps), sum(t for _, t in steps))
                    self._publish(record.id, progress)
                    now = time.monotonic()
                    if now - last_write >= _PROGRESS_WRITE_SECONDS or progress[0] == progress[1]:
                        last_write = now
                        await self._write_progress(record.id, progress)
                elif isinstance(event, ImageDone):
                    encoded.append(
                        await finish_image(
                            event.index, event.outcome, params[event.index], encoding, log_fields
                        )
                    )
            await self._succeed(record, encoded, image_format)
        except JobCancelledError:
            if record.id in self._cancelled:
                await self._finish(
                    record, JobStatus.CANCELLED, "cancelled while running", "cancelled"
                )
            else:  # stopped by this replica, not by its owner: it runs again
                await asyncio.to_thread(self.store.release, record.id, self.replica)
        except (ShuttingDownError, NotReadyError) as exc:
            # The drain ran out, or this replica's model is gone: not the job's fault, so it
            # runs again, at the next start or on another replica.
            await asyncio.to_thread(self.store.release, record.id, self.replica)
            logger.info("job_released", reason=exc.detail)
        except ServiceError as exc:
            await self._finish(record, JobStatus.FAILED, exc.detail, exc.openai_code or "failed")
        except SQLAlchemyError:
            logger.exception("job_store_write_failed")
            await self._finish(
                record,
                JobStatus.FAILED,
                "the images could not be stored (the job store is full or not writable)",
                "storage_error",
            )
        except Exception:
            # A bug must not leave the job `running` for ever: it fails, with the generic text.
            logger.exception("job_failed")
            await self._finish(record, JobStatus.FAILED, GenerationFailedError().detail, "failed")
        finally:
            self._publish(record.id, None)
            self._running.pop(record.id, None)
            self._cancelled.discard(record.id)
            self.wake()  # this thread is free for the next job

    async def _write_progress(self, job_id: str, progress: Progress) -> None:
        """Best effort: a progress write that fails must not fail a job whose images are fine."""
        try:
            await asyncio.to_thread(self.store.set_progress, job_id, *progress, self.replica)
        except SQLAlchemyError:
            logger.warning("job_progress_not_written", exc_info=True)

    def _publish(self, job_id: str, progress: Heard) -> None:
        for queue in self._listeners.get(job_id, ()):
            queue.put_nowait(progress)

    async def _succeed(
        self, record: JobRecord, encoded: list[EncodedImage], image_format: ImageFormat
    ) -> None:
        files = image_files(encoded, image_format)
        if await asyncio.to_thread(self.store.succeed, record.id, files, self.replica):
            logger.info("job_succeeded", images=len(files))
            await self._after_finish(record.id)
        else:
            # Its owner asked it to stop after the last step (it ends cancelled), or it was
            # deleted or taken over meanwhile (then nothing here is written).
            await self._finish(record, JobStatus.CANCELLED, "cancelled while running", "cancelled")

    async def _finish(self, record: JobRecord, status: JobStatus, message: str, code: str) -> None:
        try:
            done = await asyncio.to_thread(
                self.store.finish_unsuccessfully, record.id, status, message, code, self.replica
            )
        except SQLAlchemyError:
            logger.exception("job_store_write_failed")
            return
        if done:
            logger.info("job_finished", status=status.value, error_code=code)
            await self._after_finish(record.id)

    async def _after_finish(self, job_id: str) -> None:
        record = await asyncio.to_thread(self.store.get_any, job_id)
        if record is not None and record.webhook_status is WebhookStatus.PENDING:
            self._send_webhook(record)

    def _send_webhook(self, record: JobRecord) -> None:
        if self.webhooks is None or record.webhook is None or record.id in self._delivering:
            return  # (a second cancel of a finished job must not start a second delivery)
        self._delivering.add(record.id)
        task = asyncio.create_task(self._deliver(self.webhooks, record, record.webhook))
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)
        task.add_done_callback(lambda _task: self._delivering.discard(record.id))

    async def _deliver(self, sender: WebhookSender, record: JobRecord, url: str) -> None:
        # The job id is the message id: a receiver that sees it twice (a retry, or a restart
        # before the delivery was recorded) knows it is the same event.
        delivered = await sender.deliver(url, record.id, self._render(record))
        status = WebhookStatus.DELIVERED if delivered else WebhookStatus.FAILED
        with suppress(SQLAlchemyError):
            await asyncio.to_thread(self.store.set_webhook_status, record.id, status)
