"""The inference worker on a fake engine: order, backpressure, cancellation, deadlines, faults,
drain. Every test drives the real thread and real asyncio futures."""

import asyncio
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from structlog.testing import capture_logs

from ovis_service.errors import (
    DeadlineExceededError,
    GenerationFailedError,
    NotReadyError,
    OverloadedError,
    ShuttingDownError,
)
from ovis_service.schemas import GenerationParams
from ovis_service.worker import InferenceWorker, Job, JobOutcome, WorkerState
from tests.support.fakes import FakeEngine

WAIT = 10.0  # generous bound on anything that should happen "soon"


def params(prompt: str = "a fox", steps: int = 2, seed: int = 1) -> GenerationParams:
    return GenerationParams(
        prompt=prompt,
        negative_prompt="",
        num_inference_steps=steps,
        cfg_scale=5.0,
        width=256,
        height=256,
        seed=seed,
    )


def make_job(
    prompt: str = "a fox", steps: int = 2, deadline_in: float = math.inf, request_id: str = ""
) -> Job:
    loop = asyncio.get_running_loop()
    now = time.monotonic()
    return Job(
        request_id=request_id or prompt,
        params=params(prompt, steps),
        future=loop.create_future(),
        loop=loop,
        deadline=now + deadline_in,
        enqueued_at=now,
    )


def wait_ready(worker: InferenceWorker) -> None:
    deadline = time.monotonic() + WAIT
    while worker.snapshot().state is not WorkerState.READY:
        assert time.monotonic() < deadline, worker.snapshot()
        time.sleep(0.005)


@contextmanager
def running_worker(engine: FakeEngine, capacity: int) -> Iterator[InferenceWorker]:
    """A started, ready worker; stopped afterwards with any test gate opened."""
    worker = InferenceWorker(engine, capacity=capacity)
    worker.start()
    wait_ready(worker)
    try:
        yield worker
    finally:
        if engine.gate is not None:
            engine.gate.set()
        worker.stop(drain_timeout=0)


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(step_seconds=0.001)


@pytest.fixture
def worker(engine: FakeEngine) -> Iterator[InferenceWorker]:
    with running_worker(engine, capacity=2) as worker:
        yield worker


async def outcome(job: Job) -> JobOutcome:
    return await asyncio.wait_for(job.future, WAIT)


def test_jobs_run_in_submission_order_on_the_inference_thread_only(
    engine: FakeEngine, worker: InferenceWorker
) -> None:
    async def scenario() -> None:
        jobs = [make_job(prompt) for prompt in ("first", "second")]
        for job in jobs:
            worker.submit(job)
        results = [await outcome(job) for job in jobs]
        assert all(result.result.image.size == (256, 256) for result in results)

    asyncio.run(scenario())
    assert engine.completed == ["first", "second"]
    assert engine.threads == {"inference"}


def test_a_full_queue_is_refused_at_once_with_retry_after() -> None:
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    with running_worker(engine, capacity=2) as worker:

        async def scenario() -> None:
            running = make_job("running")
            worker.submit(running)
            assert engine.running.wait(WAIT)
            queued = [make_job(f"queued-{i}") for i in range(2)]
            for job in queued:
                worker.submit(job)
            started = time.monotonic()
            with pytest.raises(OverloadedError) as refused:
                worker.submit(make_job("one too many"))
            assert time.monotonic() - started < 0.5
            assert refused.value.status_code == 503
            assert refused.value.retry_after is not None
            assert refused.value.retry_after >= 1
            assert worker.snapshot().queue_depth == 2
            assert worker.snapshot().running == 1
            gate.set()
            for job in [running, *queued]:
                await outcome(job)

        asyncio.run(scenario())
    assert "one too many" not in engine.started


def test_retry_after_is_the_work_ahead_times_the_recent_generation_time() -> None:
    gate = threading.Event()
    engine = FakeEngine(step_seconds=0.05)
    with running_worker(engine, capacity=4) as worker:

        async def scenario() -> None:
            assert worker.retry_after() == 1  # nothing waiting: the floor
            # Two 10-step jobs teach the worker that a job takes about 0.5 s.
            for prompt in ("a", "b"):
                job = make_job(prompt, steps=10)
                worker.submit(job)
                await outcome(job)
            engine.gate = gate
            jobs = [make_job(f"q{i}", steps=1) for i in range(4)]
            for job in jobs:
                worker.submit(job)
            assert await asyncio.to_thread(engine.running.wait, WAIT)
            # 1 running + 3 queued at ~0.5 s each is ~2 s, rounded up.
            assert 2 <= worker.retry_after() <= 4
            gate.set()
            for job in jobs:
                await outcome(job)

        asyncio.run(scenario())


def test_a_cancelled_queued_job_never_reaches_the_engine() -> None:
    gate = threading.Event()
    engine = FakeEngine(gate=gate)

    async def scenario(worker: InferenceWorker) -> None:
        first = make_job("first")
        worker.submit(first)
        assert engine.running.wait(WAIT)
        abandoned = make_job("abandoned")
        worker.submit(abandoned)
        abandoned.cancel()
        abandoned.future.cancel()
        gate.set()
        await outcome(first)
        after = make_job("after")
        worker.submit(after)
        await outcome(after)

    with capture_logs() as logs, running_worker(engine, capacity=2) as worker:
        asyncio.run(scenario(worker))
    assert engine.started == ["first", "after"]
    skipped = [log for log in logs if log["event"] == "job_skipped"]
    assert skipped == [
        {
            "event": "job_skipped",
            "reason": "client_disconnected",
            "log_level": "info",
            "request_id": "abandoned",
        }
    ]


def test_a_cancelled_running_job_stops_at_the_next_step(
    engine: FakeEngine, worker: InferenceWorker
) -> None:
    async def scenario() -> None:
        long_job = make_job("long", steps=100_000)
        worker.submit(long_job)
        assert await asyncio.to_thread(engine.running.wait, WAIT)
        long_job.cancel()
        long_job.future.cancel()
        follow_up = make_job("follow-up")
        worker.submit(follow_up)
        await outcome(follow_up)

    asyncio.run(scenario())
    assert engine.completed == ["follow-up"]
    assert engine.steps_run < 10_000


def test_a_job_past_its_deadline_is_never_started(
    worker: InferenceWorker, engine: FakeEngine
) -> None:
    async def scenario() -> None:
        expired = make_job("expired", deadline_in=-1)
        worker.submit(expired)
        with pytest.raises(DeadlineExceededError):
            await outcome(expired)

    asyncio.run(scenario())
    assert "expired" not in engine.started


def test_a_running_job_is_stopped_when_its_deadline_passes(
    worker: InferenceWorker, engine: FakeEngine
) -> None:
    async def scenario() -> None:
        slow = make_job("slow", steps=100_000, deadline_in=0.2)
        worker.submit(slow)
        with pytest.raises(DeadlineExceededError) as stopped:
            await outcome(slow)
        assert stopped.value.status_code == 504

    asyncio.run(scenario())
    assert engine.completed == []
    assert engine.steps_run < 100_000


def test_a_failing_job_gets_a_generic_500_and_the_thread_keeps_serving(
    worker: InferenceWorker, engine: FakeEngine
) -> None:
    async def scenario() -> None:
        broken = make_job("fail please", request_id="req-broken")
        worker.submit(broken)
        with pytest.raises(GenerationFailedError) as failed:
            await outcome(broken)
        assert "secret" not in failed.value.detail
        healthy = make_job("healthy")
        worker.submit(healthy)
        await outcome(healthy)

    with capture_logs() as logs:
        asyncio.run(scenario())
    assert engine.completed == ["healthy"]
    failure = next(log for log in logs if log["event"] == "job_failed")
    assert failure["request_id"] == "req-broken"
    assert failure["exc_info"] is True
    assert worker.snapshot().state is WorkerState.READY


def test_out_of_memory_frees_the_cache_answers_503_and_keeps_serving(
    worker: InferenceWorker, engine: FakeEngine
) -> None:
    async def scenario() -> None:
        greedy = make_job("oom at 2048")
        worker.submit(greedy)
        with pytest.raises(OverloadedError) as refused:
            await outcome(greedy)
        assert refused.value.status_code == 503
        assert "out of memory" in refused.value.detail
        modest = make_job("modest")
        worker.submit(modest)
        await outcome(modest)

    asyncio.run(scenario())
    assert engine.oom_recoveries == 1
    assert engine.completed == ["modest"]


def test_stop_drains_queued_jobs_then_releases_the_engine() -> None:
    engine = FakeEngine(step_seconds=0.01)
    worker = InferenceWorker(engine, capacity=4)
    worker.start()
    wait_ready(worker)

    async def scenario() -> None:
        jobs = [make_job(f"job-{i}", steps=5) for i in range(4)]
        for job in jobs:
            worker.submit(job)
        await asyncio.to_thread(worker.stop, 30.0)
        for job in jobs:
            assert isinstance(await outcome(job), JobOutcome)
        with pytest.raises(ShuttingDownError):
            worker.submit(make_job("too late"))

    asyncio.run(scenario())
    assert engine.completed == [f"job-{i}" for i in range(4)]
    assert engine.released
    assert worker.snapshot().state is WorkerState.STOPPED


def test_past_the_drain_timeout_queued_and_running_jobs_get_503() -> None:
    engine = FakeEngine(step_seconds=0.01)
    worker = InferenceWorker(engine, capacity=4)
    worker.start()
    wait_ready(worker)

    async def scenario() -> None:
        running = make_job("running", steps=100_000)
        queued = make_job("queued")
        worker.submit(running)
        worker.submit(queued)
        assert await asyncio.to_thread(engine.running.wait, WAIT)
        started = time.monotonic()
        await asyncio.to_thread(worker.stop, 0.2)
        assert time.monotonic() - started < 5
        for job in (running, queued):
            with pytest.raises(ShuttingDownError) as refused:
                await outcome(job)
            assert refused.value.status_code == 503

    asyncio.run(scenario())
    assert "queued" not in engine.started
    assert engine.released


def test_jobs_are_refused_while_the_model_loads() -> None:
    engine = FakeEngine(load_seconds=0.5)
    worker = InferenceWorker(engine, capacity=2)
    worker.start()

    async def scenario() -> None:
        with pytest.raises(NotReadyError) as refused:
            worker.submit(make_job())
        assert refused.value.status_code == 503
        assert worker.snapshot().state is WorkerState.LOADING

    try:
        asyncio.run(scenario())
    finally:
        worker.stop(drain_timeout=0)


def test_a_model_that_fails_to_load_leaves_the_worker_failed() -> None:
    engine = FakeEngine(load_error=OSError("no such model"))
    worker = InferenceWorker(engine, capacity=2)
    with capture_logs() as logs:
        worker.start()
        deadline = time.monotonic() + WAIT
        while worker.snapshot().state is WorkerState.LOADING:
            assert time.monotonic() < deadline
            time.sleep(0.005)
    snapshot = worker.snapshot()
    assert snapshot.state is WorkerState.FAILED
    assert snapshot.detail == "model failed to load (OSError)"
    assert any(log["event"] == "model_load_failed" for log in logs)

    async def scenario() -> None:
        with pytest.raises(NotReadyError):
            worker.submit(make_job())

    asyncio.run(scenario())
    worker.stop(drain_timeout=0)


class _BrokenRecoveryEngine(FakeEngine):
    """A fault outside the per-job guard: recovering from OOM itself blows up."""

    def recover_from_oom(self) -> None:
        raise RuntimeError("driver gone")


def test_a_dead_inference_thread_shows_in_the_snapshot_and_fails_waiting_jobs() -> None:
    engine = _BrokenRecoveryEngine()

    async def scenario(worker: InferenceWorker) -> None:
        fatal = make_job("oom that kills")
        worker.submit(fatal)
        with pytest.raises(NotReadyError):
            await outcome(fatal)

    with capture_logs() as logs, running_worker(engine, capacity=2) as worker:
        asyncio.run(scenario(worker))
        assert worker.snapshot().state is WorkerState.DEAD
    assert any(log["event"] == "inference_thread_died" for log in logs)


def test_start_and_stop_are_idempotent(engine: FakeEngine) -> None:
    worker = InferenceWorker(engine, capacity=1)
    worker.start()
    worker.start()
    wait_ready(worker)
    worker.stop(drain_timeout=0)
    worker.stop(drain_timeout=0)
    assert worker.snapshot().state is WorkerState.STOPPED
    assert engine.released


def test_stopping_a_worker_that_never_started_returns_at_once() -> None:
    worker = InferenceWorker(FakeEngine(), capacity=1)
    worker.stop(drain_timeout=0)
    assert worker.snapshot().state is WorkerState.CREATED


def test_a_drain_that_starts_during_loading_is_reported_once_loaded() -> None:
    engine = FakeEngine(load_seconds=0.3)
    worker = InferenceWorker(engine, capacity=1)
    worker.start()
    worker.begin_drain(timeout=30)
    deadline = time.monotonic() + WAIT
    while worker.snapshot().info is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert worker.snapshot().state is WorkerState.DRAINING
    worker.stop(drain_timeout=0)
    assert worker.snapshot().state is WorkerState.STOPPED
