"""The inference worker on a fake engine: order, backpressure, cancellation, deadlines, faults,
drain, Retry-After. Every test drives real threads and real asyncio futures, and waits on events
(or a fake clock), never on how long something took."""

import asyncio
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from structlog.testing import capture_logs

from ovis_service.engine import EngineInfo, GenerationResult, ProgressCallback, StepHooks
from ovis_service.errors import (
    DeadlineExceededError,
    GenerationFailedError,
    JobCancelledError,
    NotReadyError,
    OverloadedError,
    RejectReason,
    ShuttingDownError,
)
from ovis_service.schemas import GenerationParams
from ovis_service.worker.pool import InferencePool
from ovis_service.worker.types import Job, JobOutcome, WorkerState
from tests.support.fakes import FakeClock, FakeEngine

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0  # generous bound on anything that should happen "soon"


def params(
    prompt: str = "a fox", steps: int = 2, seed: int = 1, size: int = 256
) -> GenerationParams:
    return GenerationParams(
        prompt=prompt,
        negative_prompt="",
        num_inference_steps=steps,
        cfg_scale=5.0,
        width=size,
        height=size,
        seed=seed,
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
def running_worker(
    engine: FakeEngine, capacity: int, clock: Callable[[], float] = time.monotonic
) -> Iterator[InferencePool]:
    """A started, ready worker; stopped afterwards with any test gate opened."""
    worker = InferencePool(engine, capacity=capacity, clock=clock)
    worker.start()
    wait_for_state(worker, WorkerState.READY)
    try:
        yield worker
    finally:
        if engine.gate is not None:
            engine.gate.set()
        worker.stop(drain_timeout=0)


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


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(step_seconds=0.001)


@pytest.fixture
def worker(engine: FakeEngine) -> Iterator[InferencePool]:
    with running_worker(engine, capacity=2) as worker:
        yield worker


async def outcome(job: Job) -> JobOutcome:
    return await asyncio.wait_for(job.future, WAIT)


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


def test_a_full_queue_is_refused_at_once_with_retry_after() -> None:
    # The engine holds the first job until the gate opens, so a submit that waited for room
    # would never return (and the per-test timeout would fail the test).
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
            with pytest.raises(OverloadedError) as refused:
                worker.submit(make_job("one too many"))
            assert refused.value.status_code == 503
            assert refused.value.retry_after == 1  # tiny jobs at the prior rate: the floor
            assert worker.snapshot().queue_depth == 2
            assert worker.snapshot().running == 1
            gate.set()
            for job in [running, *queued]:
                await outcome(job)

        asyncio.run(scenario())
    assert "one too many" not in engine.started


def test_a_request_for_more_images_than_there_is_room_for_is_refused_whole() -> None:
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    with running_worker(engine, capacity=3) as worker:

        async def scenario() -> None:
            worker.submit(make_job("running"))
            assert await asyncio.to_thread(engine.running.wait, WAIT)
            worker.submit(make_job("queued"))
            with pytest.raises(OverloadedError) as refused:
                worker.submit_all([make_job(f"part-{i}") for i in range(3)])
            assert "no room for 3 images" in refused.value.detail

        asyncio.run(scenario())
    assert not any(prompt.startswith("part") for prompt in engine.started)


def test_retry_after_is_the_work_ahead_at_the_measured_seconds_per_step_and_pixel() -> None:
    clock = FakeClock()
    engine = FakeEngine(step_seconds=0.5, clock=clock)
    with running_worker(engine, capacity=4, clock=clock) as worker:

        async def scenario() -> None:
            assert worker.retry_after() == 1  # nothing ahead: the floor
            # Two 10-step 1024x1024 jobs take 5.0 s each on the fake clock: 0.5 s per step of a
            # 1024x1024 image.
            for prompt in ("a", "b"):
                job = make_job(prompt, steps=10, size=1024, clock=clock)
                worker.submit(job)
                assert (await outcome(job)).generation_seconds == 5.0
            on_progress, reached, release = pause_at(4)
            running = make_job("running", steps=10, size=1024, clock=clock, on_progress=on_progress)
            worker.submit(running)
            assert await asyncio.to_thread(reached.wait, WAIT)
            queued = [make_job(f"q{i}", steps=10, size=1024, clock=clock) for i in range(3)]
            for job in queued:
                worker.submit(job)
            # 6 steps left on the running job + 3 x 10 queued = 36 steps at 0.5 s.
            assert worker.retry_after() == 18
            # A quarter of the pixels costs a quarter per step: 20 steps at 512x512 add 2.5 s.
            small = make_job("small", steps=20, size=512, clock=clock)
            worker.submit(small)
            assert worker.retry_after() == 21  # 20.5 s, rounded up
            with pytest.raises(OverloadedError) as refused:
                worker.submit(make_job("refused", clock=clock))
            assert refused.value.retry_after == 21
            release.set()
            for job in [running, *queued, small]:
                await outcome(job)
            assert worker.retry_after() == 1

        asyncio.run(scenario())


def test_a_cancelled_queued_job_never_reaches_the_engine() -> None:
    gate = threading.Event()
    engine = FakeEngine(gate=gate)

    async def scenario(worker: InferencePool) -> None:
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
            "thread": 0,
        }
    ]


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
    with running_worker(engine, capacity=1, clock=clock) as worker:

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


def test_stop_drains_queued_jobs_then_releases_the_engine() -> None:
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    worker = InferencePool(engine, capacity=4)
    worker.start()
    wait_for_state(worker, WorkerState.READY)

    async def scenario() -> None:
        jobs = [make_job(f"job-{i}", steps=5) for i in range(4)]
        for job in jobs:
            worker.submit(job)
        assert await asyncio.to_thread(engine.running.wait, WAIT)
        worker.begin_drain(30.0)
        with pytest.raises(ShuttingDownError):
            worker.submit(make_job("too late"))
        gate.set()
        await asyncio.to_thread(worker.stop, 30.0)
        for job in jobs:
            assert isinstance(await outcome(job), JobOutcome)

    asyncio.run(scenario())
    assert engine.completed == [f"job-{i}" for i in range(4)]
    assert engine.released
    assert worker.snapshot().state is WorkerState.STOPPED


def test_past_the_drain_timeout_queued_and_running_jobs_get_503() -> None:
    clock = FakeClock()
    engine = FakeEngine(step_seconds=1.0, clock=clock)
    worker = InferencePool(engine, capacity=4, clock=clock)
    worker.start()
    wait_for_state(worker, WorkerState.READY)

    async def scenario() -> None:
        on_progress, reached, release = pause_at(1)
        running = make_job("running", steps=100, clock=clock, on_progress=on_progress)
        queued = make_job("queued", clock=clock)
        worker.submit(running)
        worker.submit(queued)
        assert await asyncio.to_thread(reached.wait, WAIT)
        worker.begin_drain(5.0)  # five more fake seconds: the running job's steps 2..6
        release.set()
        await asyncio.to_thread(worker.stop, 5.0)
        for job in (running, queued):
            with pytest.raises(ShuttingDownError) as refused:
                await outcome(job)
            assert refused.value.status_code == 503

    asyncio.run(scenario())
    assert "queued" not in engine.started
    assert engine.steps_run == 7  # one before the drain, five within it, one that passed it
    assert engine.released
    assert worker.snapshot().state is WorkerState.STOPPED


class _StuckEngine(FakeEngine):
    """Ignores stop requests: a step that never ends, as a hung CUDA kernel would."""

    def __init__(self) -> None:
        super().__init__()
        self.unstick = threading.Event()

    def generate(self, params: GenerationParams, hooks: StepHooks) -> GenerationResult:
        self.running.set()
        assert self.unstick.wait(WAIT)
        return super().generate(params, hooks)


def test_stop_gives_up_on_a_stuck_thread_after_the_drain_timeout_and_grace() -> None:
    engine = _StuckEngine()
    worker = InferencePool(engine, capacity=1, join_grace=0.05)
    worker.start()
    wait_for_state(worker, WorkerState.READY)

    async def scenario() -> None:
        stuck = make_job("stuck")
        worker.submit(stuck)
        assert await asyncio.to_thread(engine.running.wait, WAIT)
        with capture_logs() as logs:
            await asyncio.to_thread(worker.stop, 0.0)
        assert [log["event"] for log in logs if log["log_level"] == "error"] == [
            "inference_thread_stuck"
        ]
        assert worker.snapshot().state is WorkerState.DRAINING  # not a clean stop
        engine.unstick.set()
        with pytest.raises(ShuttingDownError):
            await outcome(stuck)

    asyncio.run(scenario())
    worker.stop(drain_timeout=0)
    assert worker.snapshot().state is WorkerState.STOPPED


def test_jobs_are_refused_while_the_model_loads() -> None:
    engine = GatedLoadEngine()
    worker = InferencePool(engine, capacity=2)
    worker.start()
    assert engine.load_started.wait(WAIT)

    async def scenario() -> None:
        with pytest.raises(NotReadyError) as refused:
            worker.submit(make_job())
        assert refused.value.status_code == 503
        assert worker.snapshot().state is WorkerState.LOADING

    try:
        asyncio.run(scenario())
    finally:
        engine.load_gate.set()
        worker.stop(drain_timeout=0)


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


class _BrokenRecoveryEngine(FakeEngine):
    """A fault outside the per-job guard: recovering from OOM itself blows up."""

    def recover_from_oom(self) -> None:
        raise RuntimeError("driver gone")


def test_a_dead_inference_thread_shows_in_the_snapshot_and_fails_waiting_jobs() -> None:
    engine = _BrokenRecoveryEngine()

    async def scenario(worker: InferencePool) -> None:
        fatal = make_job("oom that kills")
        worker.submit(fatal)
        with pytest.raises(NotReadyError):
            await outcome(fatal)

    with capture_logs() as logs, running_worker(engine, capacity=2) as worker:
        asyncio.run(scenario(worker))
        assert worker.snapshot().state is WorkerState.DEAD
        assert worker.snapshot().threads_alive == 0
    assert any(log["event"] == "inference_thread_died" for log in logs)


def test_start_and_stop_are_idempotent(engine: FakeEngine) -> None:
    worker = InferencePool(engine, capacity=1)
    worker.start()
    worker.start()
    wait_for_state(worker, WorkerState.READY)
    worker.stop(drain_timeout=0)
    worker.stop(drain_timeout=0)
    assert worker.snapshot().state is WorkerState.STOPPED
    assert engine.released
    assert engine.threads == {"inference-0"}  # one thread, however often start was called


def test_stopping_a_worker_that_never_started_returns_at_once() -> None:
    worker = InferencePool(FakeEngine(), capacity=1)
    worker.stop(drain_timeout=0)
    assert worker.snapshot().state is WorkerState.CREATED


def test_a_drain_that_starts_during_loading_is_reported_once_loaded() -> None:
    engine = GatedLoadEngine()
    worker = InferencePool(engine, capacity=1)
    worker.start()
    assert engine.load_started.wait(WAIT)
    worker.begin_drain(timeout=30)
    assert worker.snapshot().state is WorkerState.LOADING
    engine.load_gate.set()
    wait_for_state(worker, WorkerState.DRAINING)
    assert worker.snapshot().info is not None
    worker.stop(drain_timeout=0)
    assert worker.snapshot().state is WorkerState.STOPPED


def test_the_observer_hears_every_refusal_with_its_reason_and_every_finished_job() -> None:
    gate = threading.Event()
    engine = GatedLoadEngine(gate=gate)
    observer = RecordingObserver()
    worker = InferencePool(engine, capacity=1, observer=observer)
    worker.start()
    assert engine.load_started.wait(WAIT)

    async def scenario() -> None:
        with pytest.raises(NotReadyError):
            worker.submit(make_job("while loading"))
        engine.load_gate.set()
        await asyncio.to_thread(wait_for_state, worker, WorkerState.READY)
        running = make_job("running")
        worker.submit(running)
        assert await asyncio.to_thread(engine.running.wait, WAIT)
        expired = make_job("expired", deadline_in=-1)
        worker.submit(expired)
        with pytest.raises(OverloadedError):
            worker.submit(make_job("no room"))
        gate.set()
        await outcome(running)
        with pytest.raises(DeadlineExceededError):
            await outcome(expired)
        oom = make_job("oom please")
        worker.submit(oom)
        with pytest.raises(OverloadedError):
            await outcome(oom)
        worker.begin_drain(30)
        with pytest.raises(ShuttingDownError):
            worker.submit(make_job("too late"))

    asyncio.run(scenario())
    worker.stop(drain_timeout=0)
    assert observer.rejected == [
        "loading",
        "queue_full",
        "deadline",
        "out_of_memory",
        "shutting_down",
    ]
    assert len(observer.finished) == 1
