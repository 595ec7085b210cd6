"""The pool: inference threads over one bounded queue, and the admission in front of it.

A request for n images is admitted whole or not at all, when

    queued + running + n <= live threads + OVIS_QUEUE_SIZE

so an idle thread is capacity too: with two threads and a queue of one, three images are taken
at once and the fourth is refused. Handlers call `submit_all` on the event loop; the threads
(`InferenceThread`) take jobs with `take` and never touch asyncio themselves.
"""

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Sequence

import structlog

from ovis_service.engine import Engine
from ovis_service.errors import (
    ModelLoadingError,
    NotReadyError,
    OverloadedError,
    RejectReason,
    ServiceError,
    ShuttingDownError,
)
from ovis_service.schemas import GenerationParams
from ovis_service.wait_estimate import WaitEstimator
from ovis_service.worker.thread import InferenceThread
from ovis_service.worker.types import Job, JobOutcome, WorkerObserver, WorkerSnapshot, WorkerState

logger = structlog.get_logger(__name__)

_POLL_SECONDS = 0.1
# How long `stop` waits for the threads beyond the drain timeout: the step in progress, the
# release of the engine. A thread that takes longer is reported and left behind.
_JOIN_GRACE_SECONDS = 30.0


class _NoObserver:
    def job_rejected(self, reason: RejectReason) -> None:
        return None

    def job_finished(self, outcome: JobOutcome) -> None:
        return None


class _Stop:
    """Queue sentinel: wakes a waiting thread at once when the pool stops."""


_STOP = _Stop()


class InferencePool:
    """One thread per engine, all taking jobs from one bounded queue."""

    def __init__(
        self,
        engines: Engine | Sequence[Engine],
        *,
        capacity: int,
        warmup: GenerationParams | None = None,
        clock: Callable[[], float] = time.monotonic,
        labels: Sequence[str] | None = None,
        observer: WorkerObserver | None = None,
        join_grace: float = _JOIN_GRACE_SECONDS,
    ) -> None:
        engine_list = list(engines) if isinstance(engines, Sequence) else [engines]
        if not engine_list:
            raise ValueError("the pool needs at least one engine")
        names = list(labels or (f"thread-{i}" for i in range(len(engine_list))))
        self.lock = threading.Lock()
        # Loading is serialised: from_pretrained patches torch globals while it builds modules
        # (and the tiny model seeds the global RNG), so parallel loads could corrupt each other.
        self.load_lock = threading.Lock()
        self.clock = clock
        self.warmup = warmup
        self._threads = [
            InferenceThread(i, engine, names[i], self) for i, engine in enumerate(engine_list)
        ]
        self._capacity = capacity
        self._observer: WorkerObserver = observer or _NoObserver()
        self._join_grace = join_grace
        # Admission keeps the jobs at `capacity` waiting plus one per idle thread; the queue also
        # keeps one place per thread for the stop sentinels.
        self._queue: queue.Queue[Job | _Stop] = queue.Queue(
            maxsize=capacity + 2 * len(self._threads)
        )
        self._started = False
        # Guarded by `lock`. A job counts as queued from `submit_all` until a thread marks it
        # running (or drops it) in the same locked step, so admission never sees it as neither.
        self._queued = 0
        self._queued_work = 0  # step-pixels of the queued jobs
        self._estimator = WaitEstimator()
        self._drain_deadline: float | None = None
        self._stop_requested = threading.Event()

    # -- lifecycle, called from the event loop -------------------------------------------------

    def start(self) -> None:
        with self.lock:
            if self._started:
                return
            self._started = True
            for thread in self._threads:
                thread.start()

    def begin_drain(self, timeout: float) -> None:
        """Refuse new jobs; queued ones still run until `timeout` seconds from now."""
        with self.lock:
            if self._drain_deadline is not None:
                return
            self._drain_deadline = self.clock() + timeout
            depth = self._queued
        logger.info("drain_started", queue_depth=depth, timeout_s=timeout)

    def stop(self, drain_timeout: float) -> None:
        """Drain, release every engine and join every thread, waiting at most the drain timeout
        plus a grace. Blocking: call it off the event loop."""
        self.begin_drain(drain_timeout)
        self._stop_requested.set()
        for _ in self._threads:  # the queue keeps one place per thread for these
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(_STOP)
        give_up_at = time.monotonic() + drain_timeout + self._join_grace
        for thread in self._threads:
            # Past the drain deadline a thread stops its running job at the next step, so this
            # normally returns within one denoising step and the release.
            thread.join(timeout=max(0.0, give_up_at - time.monotonic()))

    # -- used by request handlers -------------------------------------------------------------

    def submit(self, job: Job) -> None:
        self.submit_all([job])

    def submit_all(self, jobs: list[Job]) -> None:
        """Queue every job or none: a request for n images is refused whole when the pool has
        fewer than n free places (idle threads and queue places), never half-served."""
        with self.lock:
            state = self._state_locked()
            if state is not WorkerState.READY:
                raise self.count_rejection(self._refusal_locked(state))
            running = sum(thread.job is not None for thread in self._threads)
            # A READY pool has every thread alive and loaded (one dead thread makes it DEAD),
            # so each thread is a place: running a job, or free to take the next.
            if self._queued + running + len(jobs) > len(self._threads) + self._capacity:
                raise self.count_rejection(
                    OverloadedError(
                        "the queue is full; retry later"
                        if len(jobs) == 1
                        else f"the queue has no room for {len(jobs)} images; retry later",
                        retry_after=self._retry_after_locked(),
                    )
                )
            for job in jobs:
                self._queued += 1
                self._queued_work += job.work
                self._queue.put_nowait(job)

    def count_rejection(self, error: ServiceError) -> ServiceError:
        """Count `error` under its reject reason, if it has one (the threads call this, and so
        do handlers for refusals decided outside the pool, such as a request's own deadline)."""
        if error.reject_reason is not None:
            self._observer.job_rejected(error.reject_reason)
        return error

    def snapshot(self) -> WorkerSnapshot:
        with self.lock:
            return WorkerSnapshot(
                state=self._state_locked(),
                queue_depth=self._queued,
                running=sum(thread.job is not None for thread in self._threads),
                capacity=self._capacity,
                info=next((thread.info for thread in self._threads if thread.info), None),
                detail=self._detail_locked(),
                public_detail=self._detail_locked(public=True),
                threads=tuple(thread.snapshot() for thread in self._threads),
            )

    def retry_after(self) -> int:
        with self.lock:
            return self._retry_after_locked()

    @property
    def places(self) -> int:
        """The most images the pool takes at once: one per thread plus the queue."""
        return len(self._threads) + self._capacity

    def idle_threads(self) -> int:
        """Threads with nothing running and nothing queued for them, while the pool takes work:
        the places the job runner may fill from the backlog, so that synchronous requests, which
        go through the queue, never wait behind it."""
        with self.lock:
            if self._state_locked() is not WorkerState.READY:
                return 0
            running = sum(thread.job is not None for thread in self._threads)
            return max(0, len(self._threads) - running - self._queued)

    # -- used by the inference threads (`JobSource`) --------------------------------------------

    def stop_requested(self) -> bool:
        return self._stop_requested.is_set()

    def drain_expired(self) -> bool:
        deadline = self._drain_deadline
        return deadline is not None and self.clock() > deadline

    def take(self, thread: InferenceThread) -> Job | None:
        while True:
            if self.drain_expired():
                self.fail_queued(ShuttingDownError("drain timeout passed before this job ran"))
            with self.lock:
                if self._stop_requested.is_set() and self._queued == 0:
                    return None
            try:
                job = self._queue.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                continue
            if not isinstance(job, Job):
                continue
            with self.lock:
                self._queued -= 1
                self._queued_work -= job.work
                if not job.abandoned:
                    thread.job, thread.steps_done = job, 0
                    return job
            logger.info(
                "job_skipped",
                request_id=job.request_id,
                thread=thread.index,
                reason="client_disconnected",
            )

    def finished(self, outcome: JobOutcome, work: int) -> None:
        with self.lock:
            self._estimator.record(outcome.generation_seconds, work)
        self._observer.job_finished(outcome)

    def fail_queued(self, error: ServiceError) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(job, Job):
                with self.lock:
                    self._queued -= 1
                    self._queued_work -= job.work
                logger.info("job_dropped", request_id=job.request_id, reason=error.detail)
                job.resolve(self.count_rejection(error))

    # -- internals ------------------------------------------------------------------------------

    def _retry_after_locked(self) -> int:
        running = sum(thread.work_left() for thread in self._threads)
        return self._estimator.seconds_for(self._queued_work + running, len(self._threads))

    def _state_locked(self) -> WorkerState:
        if not self._started:
            return WorkerState.CREATED
        states = [thread.observed_state for thread in self._threads]
        for severe in (WorkerState.DEAD, WorkerState.FAILED):
            if severe in states:
                return severe
        if all(state is WorkerState.STOPPED for state in states):
            return WorkerState.STOPPED
        if WorkerState.LOADING in states:
            return WorkerState.LOADING
        return WorkerState.DRAINING if self._drain_deadline is not None else WorkerState.READY

    def _detail_locked(self, *, public: bool = False) -> str | None:
        for thread in self._threads:
            detail = (thread.public_detail or thread.detail) if public else thread.detail
            if detail is not None:
                return detail if len(self._threads) == 1 else f"{thread.label}: {detail}"
        return None

    def _refusal_locked(self, state: WorkerState) -> ServiceError:
        if state is WorkerState.LOADING or state is WorkerState.CREATED:
            return ModelLoadingError("the model is still loading; retry shortly", retry_after=5)
        if state is WorkerState.DRAINING or state is WorkerState.STOPPED:
            return ShuttingDownError("the service is shutting down", retry_after=5)
        return NotReadyError(
            "the model is not available: " + (self._detail_locked(public=True) or state.value)
        )
