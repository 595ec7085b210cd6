"""The one inference thread: it loads the engine, runs jobs in order and resolves their futures.

Handlers run on the event loop; this thread never touches asyncio except through
`loop.call_soon_threadsafe`, and no other thread ever touches the engine.
"""

import asyncio
import contextlib
import enum
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import structlog

from ovis_service.engine import (
    Engine,
    EngineInfo,
    GenerationResult,
    PreviewCallback,
    ProgressCallback,
    StepHooks,
)
from ovis_service.errors import (
    DeadlineExceededError,
    GenerationFailedError,
    JobCancelledError,
    NotReadyError,
    OverloadedError,
    ServiceError,
    ShuttingDownError,
)
from ovis_service.schemas import GenerationParams

logger = structlog.get_logger(__name__)

_POLL_SECONDS = 0.1
_RECENT_JOBS = 20


class WorkerState(enum.Enum):
    CREATED = "created"
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"  # the model did not load
    DEAD = "dead"  # the thread ended unexpectedly


@dataclass(frozen=True)
class JobOutcome:
    result: GenerationResult
    queue_seconds: float
    generation_seconds: float


@dataclass(eq=False)
class Job:
    request_id: str
    params: GenerationParams
    future: "asyncio.Future[JobOutcome]"
    loop: asyncio.AbstractEventLoop
    deadline: float
    enqueued_at: float
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Streaming requests watch the run; both callbacks are called on the inference thread.
    on_progress: ProgressCallback | None = None
    preview_steps: frozenset[int] = frozenset()
    on_preview: PreviewCallback | None = None

    def cancel(self) -> None:
        """Safe from any thread: a queued job is skipped, a running one stops at the next step."""
        self.cancelled.set()


class _Stop:
    """Queue sentinel."""


_STOP = _Stop()


@dataclass(frozen=True)
class WorkerSnapshot:
    state: WorkerState
    queue_depth: int
    running: int
    capacity: int
    info: EngineInfo | None
    detail: str | None


class InferenceWorker:
    def __init__(
        self,
        engine: Engine,
        *,
        capacity: int,
        warmup: GenerationParams | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._capacity = capacity
        self._warmup = warmup
        self._clock = clock
        self._queue: queue.Queue[Job | _Stop] = queue.Queue(maxsize=capacity)
        self._lock = threading.Lock()
        self._state = WorkerState.CREATED
        self._detail: str | None = None
        self._info: EngineInfo | None = None
        self._running_job: Job | None = None
        self._recent_seconds: deque[float] = deque(maxlen=_RECENT_JOBS)
        self._drain_deadline: float | None = None
        self._thread: threading.Thread | None = None
        self._stop_requested = threading.Event()

    # -- lifecycle, called from the event loop -------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._state = WorkerState.LOADING
            self._thread = threading.Thread(target=self._main, name="inference", daemon=True)
            self._thread.start()

    def begin_drain(self, timeout: float) -> None:
        """Refuse new jobs; queued ones still run until `timeout` seconds from now."""
        with self._lock:
            if self._drain_deadline is not None:
                return
            self._drain_deadline = self._clock() + timeout
            if self._state is WorkerState.READY:
                self._state = WorkerState.DRAINING
        logger.info("drain_started", queue_depth=self._queue.qsize(), timeout_s=timeout)

    def stop(self, drain_timeout: float) -> None:
        """Drain, release the engine and join the thread. Blocking: call it off the event loop."""
        self.begin_drain(drain_timeout)
        self._stop_requested.set()
        # Wakes the thread at once when there is room; it also polls the flag.
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(_STOP)
        thread = self._thread
        if thread is not None:
            # Past the drain deadline the loop stops the running job at its next step, so this
            # join waits at most for one denoising step and the release.
            thread.join()

    # -- used by request handlers -------------------------------------------------------------

    def submit(self, job: Job) -> None:
        self.submit_all([job])

    def submit_all(self, jobs: list[Job]) -> None:
        """Queue every job or none: a request for n images is refused whole when fewer than n
        places are free, never half-served."""
        with self._lock:
            state = self._state
            if state is not WorkerState.READY:
                raise self._refusal(state)
            # Only this method puts jobs, under this lock, so the free room can only grow
            # between the check and the puts.
            if self._queue.qsize() + len(jobs) > self._capacity:
                raise OverloadedError(
                    "the queue is full; retry later"
                    if len(jobs) == 1
                    else f"the queue has no room for {len(jobs)} images; retry later",
                    retry_after=self._retry_after_locked(),
                )
            for job in jobs:
                self._queue.put_nowait(job)

    def snapshot(self) -> WorkerSnapshot:
        with self._lock:
            state = self._state
            if state not in {WorkerState.STOPPED, WorkerState.FAILED, WorkerState.CREATED}:
                thread = self._thread
                if thread is not None and not thread.is_alive():
                    state = WorkerState.DEAD
            return WorkerSnapshot(
                state=state,
                queue_depth=self._queue.qsize(),
                running=1 if self._running_job is not None else 0,
                capacity=self._capacity,
                info=self._info,
                detail=self._detail,
            )

    def retry_after(self) -> int:
        with self._lock:
            return self._retry_after_locked()

    def _retry_after_locked(self) -> int:
        mean = (
            sum(self._recent_seconds) / len(self._recent_seconds) if self._recent_seconds else 1.0
        )
        waiting = self._queue.qsize() + (1 if self._running_job is not None else 0)
        return max(1, math.ceil(waiting * mean))

    def _refusal(self, state: WorkerState) -> ServiceError:
        if state is WorkerState.LOADING or state is WorkerState.CREATED:
            return NotReadyError("the model is still loading; retry shortly", retry_after=5)
        if state is WorkerState.DRAINING or state is WorkerState.STOPPED:
            return ShuttingDownError("the service is shutting down", retry_after=5)
        return NotReadyError("the model is not available: " + (self._detail or state.value))

    # -- the inference thread -----------------------------------------------------------------

    def _main(self) -> None:
        try:
            if not self._load():
                return
            self._loop()
            self._fail_queued(ShuttingDownError("the service shut down before this job ran"))
            self._engine.release()
            with self._lock:
                self._state = WorkerState.STOPPED
            logger.info("inference_thread_stopped")
        except BaseException:
            # A bug in the loop itself: leave the thread dead so /health turns 503 and the
            # orchestrator restarts the process, rather than limping on.
            logger.exception("inference_thread_died")
            with self._lock:
                self._state = WorkerState.DEAD
                self._detail = "the inference thread died"
                orphan, self._running_job = self._running_job, None
            error = NotReadyError("the inference thread died; the service needs a restart")
            if orphan is not None:
                self._resolve(orphan, error)
            self._fail_queued(error)

    def _load(self) -> bool:
        started = time.perf_counter()
        try:
            info = self._engine.load()
            if self._warmup is not None:
                warm_started = time.perf_counter()
                self._engine.generate(self._warmup, StepHooks(stop_check=lambda: None))
                logger.info("warmup_done", seconds=round(time.perf_counter() - warm_started, 3))
        except Exception as exc:
            logger.exception("model_load_failed", model=self._engine.model_id)
            with self._lock:
                self._state = WorkerState.FAILED
                self._detail = f"model failed to load ({type(exc).__name__})"
            return False
        with self._lock:
            self._info = info
            if self._state is WorkerState.LOADING:
                # A shutdown may have begun while the weights were loading.
                draining = self._drain_deadline is not None
                self._state = WorkerState.DRAINING if draining else WorkerState.READY
        logger.info(
            "model_ready",
            model=info.model,
            device=info.device,
            dtype=info.dtype,
            offload=info.offload,
            load_seconds=round(time.perf_counter() - started, 3),
        )
        return True

    def _loop(self) -> None:
        while True:
            if self._drain_expired():
                self._fail_queued(ShuttingDownError("drain timeout passed before this job ran"))
            if self._stop_requested.is_set() and self._queue.empty():
                return
            try:
                job = self._queue.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                continue
            if isinstance(job, Job):
                self._run_job(job)

    def _run_job(self, job: Job) -> None:
        log = logger.bind(request_id=job.request_id)
        if job.cancelled.is_set() or job.future.cancelled():
            log.info("job_skipped", reason="client_disconnected")
            return
        now = self._clock()
        if now > job.deadline:
            log.info("job_skipped", reason="deadline_passed")
            self._resolve(job, DeadlineExceededError("the request deadline passed while queued"))
            return
        with self._lock:
            self._running_job = job
        queue_seconds = now - job.enqueued_at
        started = time.perf_counter()
        try:
            result = self._engine.generate(job.params, self._hooks(job))
        except ServiceError as exc:
            log.info("job_stopped", reason=type(exc).__name__, detail=exc.detail)
            self._resolve(job, exc)
        except Exception as exc:
            if self._engine.is_out_of_memory(exc):
                log.warning("job_out_of_memory", width=job.params.width, height=job.params.height)
                self._engine.recover_from_oom()
                self._resolve(
                    job,
                    OverloadedError(
                        "the GPU ran out of memory for this request; retry, or ask for a "
                        "smaller image_size",
                        retry_after=self.retry_after(),
                    ),
                )
            else:
                log.exception("job_failed")
                self._resolve(job, GenerationFailedError())
        else:
            seconds = time.perf_counter() - started
            with self._lock:
                self._recent_seconds.append(seconds)
            self._resolve(job, JobOutcome(result, queue_seconds, seconds))
        with self._lock:
            self._running_job = None

    def _hooks(self, job: Job) -> StepHooks:
        hooks = StepHooks(stop_check=lambda: self._check(job), preview_steps=job.preview_steps)
        if job.on_progress is not None:
            hooks = replace(hooks, on_progress=job.on_progress)
        if job.on_preview is not None:
            hooks = replace(hooks, on_preview=job.on_preview)
        return hooks

    def _check(self, job: Job) -> None:
        if job.cancelled.is_set():
            raise JobCancelledError("the client disconnected")
        if self._clock() > job.deadline:
            raise DeadlineExceededError("the request deadline passed during generation")
        if self._drain_expired():
            raise ShuttingDownError("the service shut down during generation")

    def _drain_expired(self) -> bool:
        deadline = self._drain_deadline
        return deadline is not None and self._clock() > deadline

    def _fail_queued(self, error: ServiceError) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(job, Job):
                logger.info("job_dropped", request_id=job.request_id, reason=error.detail)
                self._resolve(job, error)

    @staticmethod
    def _resolve(job: Job, outcome: JobOutcome | BaseException) -> None:
        # A closed event loop raises RuntimeError: nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            job.loop.call_soon_threadsafe(_settle, job.future, outcome)


def _settle(future: "asyncio.Future[JobOutcome]", outcome: JobOutcome | BaseException) -> None:
    # Runs on the event loop; a client that went away has already cancelled its future.
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
