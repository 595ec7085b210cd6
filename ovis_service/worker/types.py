"""What the inference threads share with the rest of the service: jobs and their outcomes, the
worker's states and snapshots, and the observer that metrics plug into."""

import asyncio
import contextlib
import enum
import threading
from dataclasses import dataclass, field
from typing import Protocol

from ovis_service.engine import EngineInfo, GenerationResult, PreviewCallback, ProgressCallback
from ovis_service.errors import RejectReason
from ovis_service.schemas import GenerationParams
from ovis_service.wait_estimate import step_pixels


class WorkerState(enum.Enum):
    CREATED = "created"
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"  # a model did not load
    DEAD = "dead"  # a thread ended unexpectedly


class WorkerObserver(Protocol):
    """Told what the worker decided, for metrics. Called from any thread; must not block."""

    def job_rejected(self, reason: RejectReason) -> None: ...

    def job_finished(self, outcome: "JobOutcome") -> None: ...


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

    @property
    def abandoned(self) -> bool:
        """Cancelled, or nobody awaits its answer any more."""
        return self.cancelled.is_set() or self.future.cancelled()

    def resolve(self, outcome: "JobOutcome | BaseException") -> None:
        """Hand the answer to the event loop; safe from any thread."""
        # A closed event loop raises RuntimeError: nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(_settle, self.future, outcome)

    @property
    def work(self) -> int:
        return step_pixels(self.params.num_inference_steps, self.params.width, self.params.height)


@dataclass(frozen=True)
class ThreadSnapshot:
    index: int
    device: str
    state: WorkerState
    request_id: str | None  # the job running on it, if any
    steps_done: int | None
    total_steps: int | None

    @property
    def status(self) -> str:
        return "busy" if self.request_id is not None else self.state.value


@dataclass(frozen=True)
class WorkerSnapshot:
    state: WorkerState
    queue_depth: int
    running: int
    capacity: int
    info: EngineInfo | None  # the first thread's engine
    detail: str | None  # for the operator (stderr, logs): may name paths on the host
    threads: tuple[ThreadSnapshot, ...] = ()
    public_detail: str | None = None  # for anyone who asks /health or gets a 503

    @property
    def threads_alive(self) -> int:
        return sum(
            thread.state in (WorkerState.LOADING, WorkerState.READY) for thread in self.threads
        )


def _settle(future: "asyncio.Future[JobOutcome]", outcome: JobOutcome | BaseException) -> None:
    # Runs on the event loop; a client that went away has already cancelled its future.
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
