"""Several inference threads over the one queue, on fake engines: jobs run side by side, a
failure on one thread shows for the whole pool, stop drains and releases every engine."""

import asyncio
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from ovis_service.engine import EngineInfo
from ovis_service.errors import NotReadyError
from ovis_service.wait_estimate import PRIOR_SECONDS_PER_STEP_MEGAPIXEL
from ovis_service.worker.pool import InferencePool
from ovis_service.worker.types import WorkerState
from tests.support.fakes import FakeEngine
from tests.test_worker import WAIT, make_job, outcome, wait_for_state

pytestmark = pytest.mark.timeout(60)


@contextmanager
def pool(engines: list[FakeEngine], capacity: int = 4) -> Iterator[InferencePool]:
    worker = InferencePool(
        engines, capacity=capacity, labels=[f"cpu#{i}" for i in range(len(engines))]
    )
    worker.start()
    wait_for_state(worker, WorkerState.READY)
    try:
        yield worker
    finally:
        for engine in engines:
            if engine.gate is not None:
                engine.gate.set()
        worker.stop(drain_timeout=0)


def test_two_threads_run_two_jobs_at_once_and_share_the_wait() -> None:
    gate = threading.Event()
    engines = [FakeEngine(gate=gate), FakeEngine(gate=gate)]
    with pool(engines) as worker:

        async def scenario() -> None:
            running = [make_job(f"run-{i}", steps=50, size=1024) for i in range(2)]
            for job in running:
                worker.submit(job)
            for engine in engines:
                assert await asyncio.to_thread(engine.running.wait, WAIT)
            queued = [make_job(f"queued-{i}", steps=50, size=1024) for i in range(2)]
            for job in queued:
                worker.submit(job)
            snapshot = worker.snapshot()
            assert snapshot.running == 2
            assert snapshot.queue_depth == 2
            assert [t.status for t in snapshot.threads] == ["busy", "busy"]
            assert {t.request_id for t in snapshot.threads} == {"run-0", "run-1"}
            assert [t.device for t in snapshot.threads] == ["cpu", "cpu"]  # from the engines
            # 4 jobs x 50 steps of 1024x1024 at the prior rate, shared by two threads.
            megapixels = 1024 * 1024 / 1_000_000
            expected = math.ceil(PRIOR_SECONDS_PER_STEP_MEGAPIXEL * 200 * megapixels / 2)
            assert worker.retry_after() == expected
            gate.set()
            for job in [*running, *queued]:
                await outcome(job)

        asyncio.run(scenario())
    assert all(engine.completed for engine in engines)
    assert engines[0].threads == {"inference-0"}
    assert engines[1].threads == {"inference-1"}


def test_stop_drains_every_thread_and_releases_every_engine() -> None:
    gate = threading.Event()
    engines = [FakeEngine(gate=gate), FakeEngine(gate=gate)]
    worker = InferencePool(engines, capacity=4)
    worker.start()
    wait_for_state(worker, WorkerState.READY)

    async def scenario() -> None:
        jobs = [make_job(f"job-{i}") for i in range(6)]
        for job in jobs[:2]:
            worker.submit(job)
        for engine in engines:
            assert await asyncio.to_thread(engine.running.wait, WAIT)
        for job in jobs[2:]:
            worker.submit(job)
        worker.begin_drain(30)
        gate.set()
        await asyncio.to_thread(worker.stop, 30)
        for job in jobs:
            await outcome(job)

    asyncio.run(scenario())
    assert sorted(engines[0].completed + engines[1].completed) == [f"job-{i}" for i in range(6)]
    assert all(engine.released for engine in engines)
    snapshot = worker.snapshot()
    assert snapshot.state is WorkerState.STOPPED
    assert [t.state for t in snapshot.threads] == [WorkerState.STOPPED] * 2
    assert snapshot.threads_alive == 0


def test_one_thread_failing_to_load_fails_the_pool_and_names_its_device() -> None:
    engines = [FakeEngine(), FakeEngine(load_error=MemoryError("no room"))]
    worker = InferencePool(engines, capacity=2, labels=["cuda:0", "cuda:1"])
    worker.start()
    wait_for_state(worker, WorkerState.FAILED)
    snapshot = worker.snapshot()
    assert snapshot.detail is not None
    assert snapshot.detail.startswith("cuda:1: model failed to load")
    assert [t.state for t in snapshot.threads][1] is WorkerState.FAILED

    async def scenario() -> None:
        with pytest.raises(NotReadyError) as refused:
            worker.submit(make_job())
        assert "cuda:1" in refused.value.detail

    asyncio.run(scenario())
    worker.stop(drain_timeout=0)
    assert engines[0].released  # the healthy thread still gives its memory back
    assert worker.snapshot().state is WorkerState.FAILED


class _BrokenRecoveryEngine(FakeEngine):
    def recover_from_oom(self) -> None:
        raise RuntimeError("driver gone")


def test_a_dead_thread_marks_the_pool_dead_while_the_other_lives() -> None:
    # Both engines break the same way; whichever thread takes the job dies.
    engines: list[FakeEngine] = [_BrokenRecoveryEngine(), _BrokenRecoveryEngine()]
    with pool(engines) as worker:

        async def scenario() -> None:
            fatal = make_job("oom that kills")
            worker.submit(fatal)
            with pytest.raises(NotReadyError):
                await outcome(fatal)

        asyncio.run(scenario())
        snapshot = worker.snapshot()
        assert snapshot.state is WorkerState.DEAD
        assert snapshot.threads_alive == 1
        assert sorted(t.state.value for t in snapshot.threads) == ["dead", "ready"]


class _OverlapEngine(FakeEngine):
    """Records whether another engine's load ran while this one was loading."""

    def __init__(self, loading: threading.Event, overlapped: threading.Event) -> None:
        super().__init__()
        self._loading = loading
        self._overlapped = overlapped

    def load(self) -> EngineInfo:
        if self._loading.is_set():
            self._overlapped.set()
        self._loading.set()
        # Gives a parallel load every chance to begin meanwhile.
        self._overlapped.wait(0.2)
        self._loading.clear()
        return super().load()


def test_loads_run_one_at_a_time() -> None:
    loading, overlapped = threading.Event(), threading.Event()
    engines: list[FakeEngine] = [_OverlapEngine(loading, overlapped) for _ in range(2)]
    with pool(engines):
        pass
    assert not overlapped.is_set()
