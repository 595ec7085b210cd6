"""The pool on fake engines: admission (all or none, idle threads count), Retry-After, the
queue, drain and stop, loading, and several threads over one queue. Every test drives real
threads and real asyncio futures, and waits on events (or a fake clock), never on how long
something took."""

import asyncio
import math
import threading

import pytest
from structlog.testing import capture_logs

from ovis_service.engine import EngineInfo, GenerationResult, StepHooks
from ovis_service.errors import (
    DeadlineExceededError,
    NotReadyError,
    OverloadedError,
    ShuttingDownError,
)
from ovis_service.schemas import GenerationParams
from ovis_service.wait_estimate import PRIOR_SECONDS_PER_STEP_MEGAPIXEL
from ovis_service.worker.pool import InferencePool
from ovis_service.worker.types import JobOutcome, WorkerState
from tests.support.fakes import BrokenRecoveryEngine, FakeClock, FakeEngine
from tests.support.worker import (
    WAIT,
    GatedLoadEngine,
    RecordingObserver,
    make_job,
    outcome,
    pause_at,
    running_pool,
    wait_for_state,
)

pytestmark = pytest.mark.timeout(60)

# Thread labels unlike the device the fake engines report, so a snapshot shows which it read.
TWO_CPUS = ["cpu#0", "cpu#1"]


def test_a_full_queue_is_refused_at_once_with_retry_after() -> None:
    # The engine holds the first job until the gate opens, so a submit that waited for room
    # would never return (and the per-test timeout would fail the test).
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    with running_pool(engine, capacity=2) as worker:

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
    with running_pool(engine, capacity=3) as worker:

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
    with running_pool(engine, capacity=4, clock=clock) as worker:

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

    with capture_logs() as logs, running_pool(engine, capacity=2) as worker:
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


def test_two_threads_run_two_jobs_at_once_and_share_the_wait() -> None:
    gate = threading.Event()
    engines = [FakeEngine(gate=gate), FakeEngine(gate=gate)]
    with running_pool(engines, labels=TWO_CPUS) as worker:

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


def test_a_dead_thread_marks_the_pool_dead_while_the_other_lives() -> None:
    # Both engines break the same way; whichever thread takes the job dies.
    engines: list[FakeEngine] = [BrokenRecoveryEngine(), BrokenRecoveryEngine()]
    with running_pool(engines, labels=TWO_CPUS) as worker:

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


class _WatchedLock:
    """Stands in for the pool's load lock and tells the test when a thread has to queue for it."""

    def __init__(self, someone_queued: threading.Event) -> None:
        self._lock = threading.Lock()
        self._someone_queued = someone_queued

    def __enter__(self) -> "_WatchedLock":
        if not self._lock.acquire(blocking=False):
            self._someone_queued.set()
            self._lock.acquire()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._lock.release()


class _OverlapEngine(FakeEngine):
    """Holds its load until the other thread's load either queues behind it (serialised) or
    starts beside it (the overlap this test exists to catch)."""

    def __init__(
        self, loading: threading.Event, overlapped: threading.Event, go_on: threading.Event
    ) -> None:
        super().__init__()
        self._loading = loading
        self._overlapped = overlapped
        self._go_on = go_on

    def load(self) -> EngineInfo:
        if self._loading.is_set():
            self._overlapped.set()
            self._go_on.set()
        self._loading.set()
        assert self._go_on.wait(WAIT)
        self._loading.clear()
        return super().load()


def test_loads_run_one_at_a_time() -> None:
    loading, overlapped, go_on = threading.Event(), threading.Event(), threading.Event()
    engines = [_OverlapEngine(loading, overlapped, go_on) for _ in range(2)]
    worker = InferencePool(engines, capacity=1)
    worker.load_lock = _WatchedLock(go_on)  # type: ignore[assignment]
    worker.start()
    try:
        wait_for_state(worker, WorkerState.READY)
    finally:
        worker.stop(drain_timeout=0)
    assert go_on.is_set()  # the second load did queue behind the first
    assert not overlapped.is_set()


def test_a_cancelled_queued_job_leaves_nothing_in_the_retry_after_estimate() -> None:
    clock = FakeClock()
    gate = threading.Event()
    # One second per step of a one-megapixel image, on the fake clock.
    engine = FakeEngine(gate=gate, clock=clock, step_seconds=1.0)
    with running_pool(engine, capacity=2, clock=clock) as worker:

        async def scenario() -> None:
            first = make_job("first", steps=2, size=1000, clock=clock)
            worker.submit(first)
            assert await asyncio.to_thread(engine.running.wait, WAIT)
            abandoned = make_job("abandoned", steps=50, size=1000, clock=clock)
            worker.submit(abandoned)
            # Before any job finished: the prior rate, over the 50 + 2 step-megapixels ahead.
            assert worker.retry_after() == math.ceil(PRIOR_SECONDS_PER_STEP_MEGAPIXEL * 52)
            abandoned.cancel()
            abandoned.future.cancel()
            gate.set()
            await outcome(first)
            after = make_job("after", steps=1, size=1000, clock=clock)
            worker.submit(after)
            await outcome(after)  # the thread has taken, and skipped, the abandoned job
            assert worker.snapshot().queue_depth == 0
            # Measured at one second per step-megapixel now; a leftover would say 50.
            assert worker.retry_after() == 1

        asyncio.run(scenario())
    assert "abandoned" not in engine.started


def test_idle_threads_are_capacity_too_and_the_queue_keeps_its_places() -> None:
    """`queued + running + n <= live threads + OVIS_QUEUE_SIZE`: two idle threads and a queue of
    one take three jobs at once, whether or not a thread has picked any up yet."""
    gate = threading.Event()
    engines = [FakeEngine(gate=gate), FakeEngine(gate=gate)]
    with running_pool(engines, capacity=1, labels=TWO_CPUS) as worker:

        async def scenario() -> None:
            jobs = [make_job(f"burst-{i}") for i in range(3)]
            worker.submit_all(jobs)  # before either thread can take one
            with pytest.raises(OverloadedError):
                worker.submit(make_job("fourth"))
            for engine in engines:
                assert await asyncio.to_thread(engine.running.wait, WAIT)
            snapshot = worker.snapshot()
            assert (snapshot.running, snapshot.queue_depth, snapshot.capacity) == (2, 1, 1)
            with pytest.raises(OverloadedError):
                worker.submit(make_job("still no room"))
            gate.set()
            for job in jobs:
                await outcome(job)
            # Everything has answered, so every place is free again.
            worker.submit_all(again := [make_job(f"again-{i}") for i in range(3)])
            for job in again:
                await outcome(job)

        asyncio.run(scenario())
    started = engines[0].started + engines[1].started
    assert "fourth" not in started
    assert "still no room" not in started


def test_a_request_for_as_many_images_as_idle_threads_is_admitted_whole() -> None:
    gate = threading.Event()
    engines = [FakeEngine(gate=gate), FakeEngine(gate=gate)]
    with running_pool(engines, capacity=1, labels=TWO_CPUS) as worker:

        async def scenario() -> None:
            with pytest.raises(OverloadedError) as refused:
                worker.submit_all([make_job(f"too-many-{i}") for i in range(4)])
            assert "no room for 4 images" in refused.value.detail
            assert worker.snapshot().queue_depth == 0  # none of the four was queued
            pair = [make_job(f"pair-{i}") for i in range(2)]
            worker.submit_all(pair)
            gate.set()
            for job in pair:
                await outcome(job)

        asyncio.run(scenario())


def test_a_thread_is_free_again_by_the_time_its_client_hears_back() -> None:
    """A client that sends its next request as soon as it has its answer must find the thread
    it just used counted as idle, never as still running."""
    engine = FakeEngine()
    with running_pool(engine, capacity=1) as worker:

        async def scenario() -> None:
            for round_number in range(50):
                first, second = make_job(f"a-{round_number}"), make_job(f"b-{round_number}")
                worker.submit_all([first, second])  # one runs, one waits: all places taken
                await outcome(first)
                await outcome(second)
                assert worker.snapshot().running == 0

        asyncio.run(scenario())
