"""One inference thread on a fake engine: order, cancellation and deadlines between steps,
failures and out-of-memory, load failures and a thread that dies."""

import asyncio

import pytest
from structlog.testing import capture_logs

from ovis_service.errors import (
    DeadlineExceededError,
    GenerationFailedError,
    JobCancelledError,
    NotReadyError,
    OverloadedError,
)
from ovis_service.worker.pool import InferencePool
from ovis_service.worker.types import WorkerState
from tests.support.fakes import BrokenRecoveryEngine, FakeClock, FakeEngine
from tests.support.worker import (
    WAIT,
    make_job,
    outcome,
    pause_at,
    running_pool,
    wait_for_state,
)

pytestmark = pytest.mark.timeout(60)


def test_jobs_run_in_submission_order_on_the_inference_thread_only(
    engine: FakeEngine, worker: InferencePool
) -> None:
    async def scenario() -> None:
        jobs = [make_job(prompt) for prompt in ("first", "second")]
        for job in jobs:
            worker.submit(job)
        results = [await outcome(job) for job in jobs]
        assert all(result.result.image.size == (256, 256) for result in results)

    asyncio.run(scenario())
    assert engine.completed == ["first", "second"]
    assert engine.threads == {"inference-0"}


def test_a_cancelled_running_job_stops_at_the_next_step(
    engine: FakeEngine, worker: InferencePool
) -> None:
    async def scenario() -> None:
        on_progress, reached, release = pause_at(3)
        long_job = make_job("long", steps=100, on_progress=on_progress)
        worker.submit(long_job)
        assert await asyncio.to_thread(reached.wait, WAIT)
        long_job.cancel()
        release.set()
        with pytest.raises(JobCancelledError):
            await outcome(long_job)
        follow_up = make_job("follow-up")
        worker.submit(follow_up)
        await outcome(follow_up)

    asyncio.run(scenario())
    assert engine.completed == ["follow-up"]
    assert engine.steps_run == 4 + 2  # the step after the cancel, then the follow-up's two


def test_a_job_past_its_deadline_is_never_started(
    worker: InferencePool, engine: FakeEngine
) -> None:
    async def scenario() -> None:
        expired = make_job("expired", deadline_in=-1)
        worker.submit(expired)
        with pytest.raises(DeadlineExceededError):
            await outcome(expired)

    asyncio.run(scenario())
    assert "expired" not in engine.started


def test_a_running_job_is_stopped_at_the_first_step_past_its_deadline() -> None:
    clock = FakeClock()
    engine = FakeEngine(step_seconds=0.25, clock=clock)
    with running_pool(engine, capacity=1, clock=clock) as worker:

        async def scenario() -> None:
            slow = make_job("slow", steps=100, deadline_in=2.0, clock=clock)
            worker.submit(slow)
            with pytest.raises(DeadlineExceededError) as stopped:
                await outcome(slow)
            assert stopped.value.status_code == 504

        asyncio.run(scenario())
    assert engine.completed == []
    assert engine.steps_run == 9  # 8 steps reach the deadline; the ninth passes it


def test_a_failing_job_gets_a_generic_500_and_the_thread_keeps_serving(
    worker: InferencePool, engine: FakeEngine
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
    worker: InferencePool, engine: FakeEngine
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


def test_a_model_that_fails_to_load_leaves_the_worker_failed() -> None:
    engine = FakeEngine(load_error=OSError("no such model"))
    worker = InferencePool(engine, capacity=2)
    with capture_logs() as logs:
        worker.start()
        wait_for_state(worker, WorkerState.FAILED)
    snapshot = worker.snapshot()
    assert snapshot.detail == "model failed to load: no such model"
    # One line names the cause; the traceback is only in the DEBUG record.
    [failed] = [log for log in logs if log["event"] == "model_load_failed"]
    assert failed["cause"] == "no such model"
    assert "exc_info" not in failed
    [trace] = [log for log in logs if log["event"] == "model_load_traceback"]
    assert trace["log_level"] == "debug"

    async def scenario() -> None:
        with pytest.raises(NotReadyError):
            worker.submit(make_job())

    asyncio.run(scenario())
    worker.stop(drain_timeout=0)
    assert worker.snapshot().state is WorkerState.FAILED  # a failed start never reads as clean


def test_a_dead_inference_thread_shows_in_the_snapshot_and_fails_waiting_jobs() -> None:
    engine = BrokenRecoveryEngine()

    async def scenario(worker: InferencePool) -> None:
        fatal = make_job("oom that kills")
        worker.submit(fatal)
        with pytest.raises(NotReadyError):
            await outcome(fatal)

    with capture_logs() as logs, running_pool(engine, capacity=2) as worker:
        asyncio.run(scenario(worker))
        assert worker.snapshot().state is WorkerState.DEAD
        assert worker.snapshot().threads_alive == 0
    assert any(log["event"] == "inference_thread_died" for log in logs)
