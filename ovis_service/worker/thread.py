"""One inference thread: it loads its engine, takes jobs from its pool until the pool stops, runs
each with step hooks, and releases the engine. No other thread ever touches the engine, and the
thread reaches the event loop only through `Job.resolve`."""

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

import structlog
from structlog.typing import FilteringBoundLogger

from ovis_service.engine import Engine, EngineInfo, StepHooks
from ovis_service.errors import (
    DeadlineExceededError,
    GenerationFailedError,
    JobCancelledError,
    NotReadyError,
    OutOfMemoryError,
    ServiceError,
    ShuttingDownError,
)
from ovis_service.schemas import GenerationParams
from ovis_service.worker.types import Job, JobOutcome, ThreadSnapshot, WorkerState

logger = structlog.get_logger(__name__)


class JobSource(Protocol):
    """What an inference thread asks of its pool (`InferencePool` is the one implementation)."""

    lock: threading.Lock  # guards the pool's counters and every thread's shared fields
    load_lock: threading.Lock  # loads run one at a time
    clock: Callable[[], float]
    warmup: GenerationParams | None

    def stop_requested(self) -> bool: ...

    def drain_expired(self) -> bool: ...

    def take(self, thread: "InferenceThread") -> Job | None:
        """The next job, already marked as running on `thread`; None once the pool stops."""
        ...

    def count_rejection(self, error: ServiceError) -> ServiceError:
        """Count `error` in the metrics if it is a rejection; returns it."""
        ...

    def finished(self, outcome: JobOutcome, work: int) -> None: ...

    def fail_queued(self, error: ServiceError) -> None: ...

    def retry_after(self) -> int: ...


class InferenceThread:
    """One engine and the thread that owns it. Fields other than `engine` are read by the pool
    under `source.lock`, and written under it."""

    def __init__(self, index: int, engine: Engine, label: str, source: JobSource) -> None:
        self.index = index
        self.engine = engine
        self.label = label
        self._source = source
        self.state = WorkerState.CREATED
        self.info: EngineInfo | None = None
        self.detail: str | None = None  # for the operator; may name host paths
        self.public_detail: str | None = None  # for clients
        self.job: Job | None = None
        self.steps_done = 0
        self._thread: threading.Thread | None = None
        self._log: FilteringBoundLogger = logger.bind(thread=index, device=label)

    # -- read by the pool, under its lock ------------------------------------------------------

    @property
    def observed_state(self) -> WorkerState:
        alive = self._thread is not None and self._thread.is_alive()
        if self.state in (WorkerState.LOADING, WorkerState.READY) and not alive:
            return WorkerState.DEAD
        return self.state

    def snapshot(self) -> ThreadSnapshot:
        job = self.job
        return ThreadSnapshot(
            index=self.index,
            device=self.info.device if self.info else self.label,
            state=self.observed_state,
            request_id=job.request_id if job else None,
            steps_done=self.steps_done if job else None,
            total_steps=job.params.num_inference_steps if job else None,
        )

    def work_left(self) -> int:
        """Step-pixels the running job still needs, for Retry-After."""
        job = self.job
        if job is None:
            return 0
        params = job.params
        return (params.num_inference_steps - self.steps_done) * params.width * params.height

    # -- lifecycle, called by the pool ---------------------------------------------------------

    def start(self) -> None:
        self.state = WorkerState.LOADING
        self._thread = threading.Thread(
            target=self._main, name=f"inference-{self.index}", daemon=True
        )
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread is None:
            return
        self._thread.join(timeout=timeout)
        if self._thread.is_alive():
            self._log.error("inference_thread_stuck")

    # -- the thread itself ---------------------------------------------------------------------

    def _main(self) -> None:
        try:
            if not self._load():
                return
            while (job := self._source.take(self)) is not None:
                self._run(job)
            self._source.fail_queued(ShuttingDownError("the service shut down before this job ran"))
            self.engine.release()
            with self._source.lock:
                self.state = WorkerState.STOPPED
            self._log.info("inference_thread_stopped")
        except BaseException:
            # A bug in the loop itself: leave the thread dead so /health turns 503 and the
            # orchestrator restarts the process, rather than limping on.
            self._log.exception("inference_thread_died")
            with self._source.lock:
                self.state = WorkerState.DEAD
                self.detail = "the inference thread died"
                orphan, self.job = self.job, None
            error = NotReadyError("the inference thread died; the service needs a restart")
            if orphan is not None:
                orphan.resolve(error)
            self._source.fail_queued(error)

    def _load(self) -> bool:
        source = self._source
        started = time.perf_counter()
        try:
            with source.load_lock:
                if source.stop_requested():
                    # Stopped while waiting for another thread's load: nothing to release.
                    with source.lock:
                        self.state = WorkerState.STOPPED
                    return False
                info = self.engine.load()
            if source.warmup is not None:
                warm_started = time.perf_counter()
                self.engine.generate(source.warmup, StepHooks(stop_check=lambda: None))
                self._log.info("warmup_done", seconds=round(time.perf_counter() - warm_started, 3))
        except Exception as exc:
            # One line names the cause (the engine words it); the traceback is for DEBUG.
            cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            self._log.error("model_load_failed", model=self.engine.model_id, cause=cause)
            self._log.debug("model_load_traceback", exc_info=True)
            with source.lock:
                self.state = WorkerState.FAILED
                self.detail = f"model failed to load: {cause}"
                # The cause can name paths on the host; clients only learn where to look.
                self.public_detail = "model failed to load; the service log names the cause"
            return False
        with source.lock:
            self.info = info
            self.state = WorkerState.READY
        self._log.info(
            "model_ready",
            model=info.model,
            device=info.device,
            dtype=info.dtype,
            offload=info.offload,
            levers=info.levers,
            load_seconds=round(time.perf_counter() - started, 3),
        )
        return True

    def _run(self, job: Job) -> None:
        answer = self._generate(job, logger.bind(request_id=job.request_id, thread=self.index))
        # The thread is free before the client hears back, so a client that sends its next
        # request on the answer finds the capacity it just gave back. Not in a `finally`: if
        # `_generate` itself breaks, `_main` fails this job.
        with self._source.lock:
            self.job = None
        job.resolve(answer)

    def _generate(self, job: Job, log: FilteringBoundLogger) -> JobOutcome | ServiceError:
        source = self._source
        started = source.clock()
        if started > job.deadline:
            log.info("job_skipped", reason="deadline_passed")
            return source.count_rejection(
                DeadlineExceededError("the request deadline passed while queued")
            )
        try:
            result = self.engine.generate(job.params, self._hooks(job))
        except ServiceError as exc:
            log.info("job_stopped", reason=type(exc).__name__, detail=exc.detail)
            return source.count_rejection(exc)
        except Exception as exc:
            if not self.engine.is_out_of_memory(exc):
                log.exception("job_failed")
                return GenerationFailedError()
            log.warning("job_out_of_memory", width=job.params.width, height=job.params.height)
            self.engine.recover_from_oom()
            message = (
                "the GPU ran out of memory for this request; retry, or ask for a smaller image_size"
            )
            return source.count_rejection(
                OutOfMemoryError(message, retry_after=source.retry_after())
            )
        outcome = JobOutcome(result, started - job.enqueued_at, source.clock() - started)
        source.finished(outcome, job.work)
        return outcome

    def _hooks(self, job: Job) -> StepHooks:
        report = job.on_progress

        def on_progress(steps_done: int, total: int) -> None:
            with self._source.lock:
                self.steps_done = steps_done  # for Retry-After and /health
            if report is not None:
                report(steps_done, total)

        hooks = StepHooks(
            stop_check=lambda: self._check(job),
            on_progress=on_progress,
            preview_steps=job.preview_steps,
        )
        if job.on_preview is not None:
            hooks = replace(hooks, on_preview=job.on_preview)
        return hooks

    def _check(self, job: Job) -> None:
        if job.cancelled.is_set():
            raise JobCancelledError("the client disconnected")
        if self._source.clock() > job.deadline:
            raise DeadlineExceededError("the request deadline passed during generation")
        if self._source.drain_expired():
            raise ShuttingDownError("the service shut down during generation")
