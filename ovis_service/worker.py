"""Inference threads over one bounded queue.

Each thread owns one engine (one pipeline on one device): it loads it, takes jobs from the
shared queue in order and resolves their futures. Handlers run on the event loop; the threads
never touch asyncio except through `loop.call_soon_threadsafe`, and no engine is ever touched by
a thread other than its own.
"""

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import structlog
from structlog.typing import FilteringBoundLogger

from ovis_service.engine import Engine, EngineInfo, StepHooks
from ovis_service.errors import (
    DeadlineExceededError,
    GenerationFailedError,
    JobCancelledError,
    NotReadyError,
    OverloadedError,
    ServiceError,
    ShuttingDownError,
)
from ovis_service.job_types import (
    Job,
    JobOutcome,
    RejectReason,
    ThreadSnapshot,
    WorkerObserver,
    WorkerSnapshot,
    WorkerState,
)
from ovis_service.schemas import GenerationParams
from ovis_service.wait_estimate import WaitEstimator

# The types live in `job_types`; the rest of the service imports them from here too.
__all__ = [
    "InferenceWorker",
    "Job",
    "JobOutcome",
    "RejectReason",
    "ThreadSnapshot",
    "WorkerObserver",
    "WorkerSnapshot",
    "WorkerState",
]

logger = structlog.get_logger(__name__)

_POLL_SECONDS = 0.1
# How long `stop` waits for the threads beyond the drain timeout: the step in progress, the
# release of the engine. A thread that takes longer is reported and left behind.
_JOIN_GRACE_SECONDS = 30.0


class _NoObserver:
    def job_rejected(self, reason: RejectReason) -> None:
        return None

    def job_finished(self, outcome: "JobOutcome") -> None:
        return None


class _Stop:
    """Queue sentinel: wakes a waiting thread at once when the worker stops."""


_STOP = _Stop()


@dataclass(eq=False)
class _Slot:
    """One inference thread and its engine; every field but `engine` is guarded by the lock."""

    index: int
    engine: Engine
    label: str
    state: WorkerState = WorkerState.CREATED
    info: EngineInfo | None = None
    detail: str | None = None
    public_detail: str | None = None
    thread: threading.Thread | None = None
    job: Job | None = None
    steps_done: int = 0

    def observed_state(self) -> WorkerState:
        alive = self.thread is not None and self.thread.is_alive()
        if self.state in (WorkerState.LOADING, WorkerState.READY) and not alive:
            return WorkerState.DEAD
        return self.state


class InferenceWorker:
    """The pool: one thread per engine, all taking jobs from one bounded queue."""

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
            raise ValueError("the worker needs at least one engine")
        names = (
            list(labels) if labels is not None else [f"thread-{i}" for i in range(len(engine_list))]
        )
        self._slots = [
            _Slot(index=i, engine=engine, label=names[i]) for i, engine in enumerate(engine_list)
        ]
        self._capacity = capacity
        self._warmup = warmup
        self._clock = clock
        self._observer: WorkerObserver = observer or _NoObserver()
        self._join_grace = join_grace
        self._queue: queue.Queue[Job | _Stop] = queue.Queue(maxsize=capacity + len(self._slots))
        self._lock = threading.Lock()
        # Loading is serialised: from_pretrained patches torch globals while it builds modules
        # (and the tiny model seeds the global RNG), so parallel loads could corrupt each other.
        self._load_lock = threading.Lock()
        self._started = False
        self._queued_work = 0  # step-pixels of the jobs in the queue
        self._estimator = WaitEstimator()
        self._drain_deadline: float | None = None
        self._stop_requested = threading.Event()

    # -- lifecycle, called from the event loop -------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
            for slot in self._slots:
                slot.state = WorkerState.LOADING
                slot.thread = threading.Thread(
                    target=self._main, args=(slot,), name=f"inference-{slot.index}", daemon=True
                )
                slot.thread.start()

    def begin_drain(self, timeout: float) -> None:
        """Refuse new jobs; queued ones still run until `timeout` seconds from now."""
        with self._lock:
            if self._drain_deadline is not None:
                return
            self._drain_deadline = self._clock() + timeout
        logger.info("drain_started", queue_depth=self._queue_depth(), timeout_s=timeout)

    def stop(self, drain_timeout: float) -> None:
        """Drain, release every engine and join every thread, waiting at most the drain timeout
        plus a grace. Blocking: call it off the event loop."""
        self.begin_drain(drain_timeout)
        self._stop_requested.set()
        for _ in self._slots:  # the queue keeps one place per thread for these
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(_STOP)
        give_up_at = time.monotonic() + drain_timeout + self._join_grace
        for slot in self._slots:
            thread = slot.thread
            if thread is None:
                continue
            # Past the drain deadline the loop stops the running job at its next step, so this
            # normally returns within one denoising step and the release.
            thread.join(timeout=max(0.0, give_up_at - time.monotonic()))
            if thread.is_alive():
                logger.error("inference_thread_stuck", thread=slot.index, device=slot.label)

    # -- used by request handlers -------------------------------------------------------------

    def submit(self, job: Job) -> None:
        self.submit_all([job])

    def submit_all(self, jobs: list[Job]) -> None:
        """Queue every job or none: a request for n images is refused whole when fewer than n
        places are free, never half-served."""
        with self._lock:
            state = self._state_locked()
            if state is not WorkerState.READY:
                raise self._refusal(state)
            # Only this method puts jobs, under this lock, so the free room can only grow
            # between the check and the puts.
            if self._queue_depth() + len(jobs) > self._capacity:
                self._observer.job_rejected("queue_full")
                raise OverloadedError(
                    "the queue is full; retry later"
                    if len(jobs) == 1
                    else f"the queue has no room for {len(jobs)} images; retry later",
                    retry_after=self._retry_after_locked(),
                )
            for job in jobs:
                self._queued_work += job.work
                self._queue.put_nowait(job)

    def count_rejection(self, reason: RejectReason) -> None:
        """For refusals decided outside the worker, such as a request's own deadline."""
        self._observer.job_rejected(reason)

    def snapshot(self) -> WorkerSnapshot:
        with self._lock:
            threads = tuple(
                ThreadSnapshot(
                    index=slot.index,
                    device=slot.info.device if slot.info else slot.label,
                    state=slot.observed_state(),
                    request_id=slot.job.request_id if slot.job else None,
                    steps_done=slot.steps_done if slot.job else None,
                    total_steps=slot.job.params.num_inference_steps if slot.job else None,
                )
                for slot in self._slots
            )
            return WorkerSnapshot(
                state=self._state_locked(),
                queue_depth=self._queue_depth(),
                running=sum(slot.job is not None for slot in self._slots),
                capacity=self._capacity,
                info=next((slot.info for slot in self._slots if slot.info), None),
                detail=self._detail_locked(),
                public_detail=self._detail_locked(public=True),
                threads=threads,
            )

    def retry_after(self) -> int:
        with self._lock:
            return self._retry_after_locked()

    def _queue_depth(self) -> int:
        # Sentinels are not work; they only ever enter the queue once stopping has begun.
        with self._queue.mutex:
            return sum(isinstance(item, Job) for item in self._queue.queue)

    def _retry_after_locked(self) -> int:
        running = sum(
            (slot.job.params.num_inference_steps - slot.steps_done)
            * slot.job.params.width
            * slot.job.params.height
            for slot in self._slots
            if slot.job is not None
        )
        return self._estimator.seconds_for(self._queued_work + running, len(self._slots))

    def _state_locked(self) -> WorkerState:
        if not self._started:
            return WorkerState.CREATED
        states = [slot.observed_state() for slot in self._slots]
        for severe in (WorkerState.DEAD, WorkerState.FAILED):
            if severe in states:
                return severe
        if all(state is WorkerState.STOPPED for state in states):
            return WorkerState.STOPPED
        if WorkerState.LOADING in states:
            return WorkerState.LOADING
        return WorkerState.DRAINING if self._drain_deadline is not None else WorkerState.READY

    def _detail_locked(self, *, public: bool = False) -> str | None:
        for slot in self._slots:
            detail = (slot.public_detail or slot.detail) if public else slot.detail
            if detail is not None:
                return detail if len(self._slots) == 1 else f"{slot.label}: {detail}"
        return None

    def _refusal(self, state: WorkerState) -> ServiceError:
        if state is WorkerState.LOADING or state is WorkerState.CREATED:
            self._observer.job_rejected("loading")
            return NotReadyError("the model is still loading; retry shortly", retry_after=5)
        if state is WorkerState.DRAINING or state is WorkerState.STOPPED:
            self._observer.job_rejected("shutting_down")
            return ShuttingDownError("the service is shutting down", retry_after=5)
        return NotReadyError(
            "the model is not available: " + (self._detail_locked(public=True) or state.value)
        )

    # -- the inference threads ----------------------------------------------------------------

    def _main(self, slot: _Slot) -> None:
        log = logger.bind(thread=slot.index, device=slot.label)
        try:
            if not self._load(slot, log):
                return
            self._loop(slot)
            self._fail_queued(ShuttingDownError("the service shut down before this job ran"))
            slot.engine.release()
            with self._lock:
                slot.state = WorkerState.STOPPED
            log.info("inference_thread_stopped")
        except BaseException:
            # A bug in the loop itself: leave the thread dead so /health turns 503 and the
            # orchestrator restarts the process, rather than limping on.
            log.exception("inference_thread_died")
            with self._lock:
                slot.state = WorkerState.DEAD
                slot.detail = "the inference thread died"
                orphan, slot.job = slot.job, None
            error = NotReadyError("the inference thread died; the service needs a restart")
            if orphan is not None:
                self._resolve(orphan, error)
            self._fail_queued(error)

    def _load(self, slot: _Slot, log: FilteringBoundLogger) -> bool:
        started = time.perf_counter()
        try:
            with self._load_lock:
                if self._stop_requested.is_set():
                    # Stopped while waiting for another thread's load: nothing to release.
                    with self._lock:
                        slot.state = WorkerState.STOPPED
                    return False
                info = slot.engine.load()
            if self._warmup is not None:
                warm_started = time.perf_counter()
                slot.engine.generate(self._warmup, StepHooks(stop_check=lambda: None))
                log.info("warmup_done", seconds=round(time.perf_counter() - warm_started, 3))
        except Exception as exc:
            # One line names the cause (the engine words it); the traceback is for DEBUG.
            cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            log.error("model_load_failed", model=slot.engine.model_id, cause=cause)
            log.debug("model_load_traceback", exc_info=True)
            with self._lock:
                slot.state = WorkerState.FAILED
                slot.detail = f"model failed to load: {cause}"
                # The cause can name paths on the host; clients only learn where to look.
                slot.public_detail = "model failed to load; the service log names the cause"
            return False
        with self._lock:
            slot.info = info
            slot.state = WorkerState.READY
        log.info(
            "model_ready",
            model=info.model,
            device=info.device,
            dtype=info.dtype,
            offload=info.offload,
            levers=info.levers,
            load_seconds=round(time.perf_counter() - started, 3),
        )
        return True

    def _loop(self, slot: _Slot) -> None:
        while True:
            if self._drain_expired():
                self._fail_queued(ShuttingDownError("drain timeout passed before this job ran"))
            if self._stop_requested.is_set() and self._queue_depth() == 0:
                return
            try:
                job = self._queue.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                continue
            if isinstance(job, Job):
                self._run_job(slot, job)

    def _run_job(self, slot: _Slot, job: Job) -> None:
        log = logger.bind(request_id=job.request_id, thread=slot.index)
        with self._lock:
            self._queued_work -= job.work
            if not (job.cancelled.is_set() or job.future.cancelled()):
                slot.job, slot.steps_done = job, 0
        if slot.job is not job:
            log.info("job_skipped", reason="client_disconnected")
            return
        self._generate(slot, job, log)
        # Not in a `finally`: if `_generate` itself breaks, the thread's handler fails this job.
        with self._lock:
            slot.job = None

    def _generate(self, slot: _Slot, job: Job, log: FilteringBoundLogger) -> None:
        now = self._clock()
        if now > job.deadline:
            log.info("job_skipped", reason="deadline_passed")
            self._observer.job_rejected("deadline")
            self._resolve(job, DeadlineExceededError("the request deadline passed while queued"))
            return
        try:
            result = slot.engine.generate(job.params, self._hooks(slot, job))
        except ServiceError as exc:
            log.info("job_stopped", reason=type(exc).__name__, detail=exc.detail)
            if isinstance(exc, DeadlineExceededError):
                self._observer.job_rejected("deadline")
            elif isinstance(exc, ShuttingDownError):
                self._observer.job_rejected("shutting_down")
            self._resolve(job, exc)
        except Exception as exc:
            if not slot.engine.is_out_of_memory(exc):
                log.exception("job_failed")
                self._resolve(job, GenerationFailedError())
                return
            log.warning("job_out_of_memory", width=job.params.width, height=job.params.height)
            slot.engine.recover_from_oom()
            self._observer.job_rejected("out_of_memory")
            self._resolve(
                job,
                OverloadedError(
                    "the GPU ran out of memory for this request; retry, or ask for a "
                    "smaller image_size",
                    retry_after=self.retry_after(),
                ),
            )
        else:
            seconds = self._clock() - now
            with self._lock:
                self._estimator.record(seconds, job.work)
            outcome = JobOutcome(result, now - job.enqueued_at, seconds)
            self._observer.job_finished(outcome)
            self._resolve(job, outcome)

    def _hooks(self, slot: _Slot, job: Job) -> StepHooks:
        report = job.on_progress

        def on_progress(steps_done: int, total: int) -> None:
            with self._lock:
                slot.steps_done = steps_done  # for Retry-After and /health
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
                with self._lock:
                    self._queued_work -= job.work
                logger.info("job_dropped", request_id=job.request_id, reason=error.detail)
                if isinstance(error, ShuttingDownError):
                    self._observer.job_rejected("shutting_down")
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
