"""Helpers for tests that drive the inference pool directly: a started pool, jobs, gates, a
recording observer."""

import asyncio
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ovis_service.engine import EngineInfo, ProgressCallback
from ovis_service.errors import RejectReason
from ovis_service.schemas import GenerationParams
from ovis_service.worker.pool import InferencePool
from ovis_service.worker.types import Job, JobOutcome, WorkerObserver, WorkerState
from tests.support.fakes import FakeEngine

WAIT = 10.0  # generous bound on anything that should happen "soon"


def params(
    prompt: str = "a fox", steps: int = 2, seed: int = 1, size: int = 256
) -> GenerationParams:
    return GenerationParams(
        prompt=prompt, num_inference_steps=steps, width=size, height=size, seed=seed
    )


def make_job(
    prompt: str = "a fox",
    steps: int = 2,
    deadline_in: float = math.inf,
    request_id: str = "",
    *,
    size: int = 256,
    clock: Callable[[], float] = time.monotonic,
    on_progress: ProgressCallback | None = None,
) -> Job:
    loop = asyncio.get_running_loop()
    now = clock()
    return Job(
        request_id=request_id or prompt,
        params=params(prompt, steps, size=size),
        future=loop.create_future(),
        loop=loop,
        deadline=now + deadline_in,
        enqueued_at=now,
        on_progress=on_progress,
    )


def pause_at(step: int) -> tuple[ProgressCallback, threading.Event, threading.Event]:
    """A progress callback that holds the inference thread after `step` steps until released."""
    reached, release = threading.Event(), threading.Event()

    def on_progress(steps_done: int, _total: int) -> None:
        if steps_done == step:
            reached.set()
            release.wait(WAIT)

    return on_progress, reached, release


def wait_for_state(worker: InferencePool, *states: WorkerState) -> None:
    deadline = time.monotonic() + WAIT
    while worker.snapshot().state not in states:
        assert time.monotonic() < deadline, worker.snapshot()
        time.sleep(0.005)


@contextmanager
def running_pool(
    engines: FakeEngine | Sequence[FakeEngine],
    capacity: int = 4,
    *,
    labels: Sequence[str] | None = None,
    clock: Callable[[], float] = time.monotonic,
    observer: WorkerObserver | None = None,
) -> Iterator[InferencePool]:
    """A started, ready pool with one inference thread per engine; stopped afterwards with every
    test gate opened, so a test that fails midway never leaves a thread waiting at one."""
    engine_list = [engines] if isinstance(engines, FakeEngine) else list(engines)
    pool = InferencePool(
        engine_list, capacity=capacity, labels=labels, clock=clock, observer=observer
    )
    pool.start()
    wait_for_state(pool, WorkerState.READY)
    try:
        yield pool
    finally:
        for engine in engine_list:
            if engine.gate is not None:
                engine.gate.set()
        pool.stop(drain_timeout=0)


class GatedLoadEngine(FakeEngine):
    """`load` waits until the test opens `load_gate`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.load_started = threading.Event()
        self.load_gate = threading.Event()

    def load(self) -> EngineInfo:
        self.load_started.set()
        assert self.load_gate.wait(WAIT)
        return super().load()


class RecordingObserver:
    def __init__(self) -> None:
        self.rejected: list[RejectReason] = []
        self.finished: list[JobOutcome] = []

    def job_rejected(self, reason: RejectReason) -> None:
        self.rejected.append(reason)

    def job_finished(self, outcome: JobOutcome) -> None:
        self.finished.append(outcome)


async def outcome(job: Job) -> JobOutcome:
    return await asyncio.wait_for(job.future, WAIT)
