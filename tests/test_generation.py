"""A request's jobs from the queue to their outcomes (`ovis_service.generation`), on real pools of
fake engines: one failed image cancels its siblings, a hang-up cancels every job, and the
deadline backstop answers when a step never ends."""

import asyncio
import threading
import time
from typing import Any, cast

import pytest
from litestar import Request

from ovis_service import generation
from ovis_service.errors import DeadlineExceededError, GenerationFailedError, JobCancelledError
from ovis_service.generation import Generation, ImageDone, StepDone, submit
from ovis_service.worker.pool import InferencePool
from ovis_service.worker.types import Job
from tests.support.fakes import FakeEngine
from tests.support.worker import WAIT, RecordingObserver, params, running_pool

pytestmark = pytest.mark.timeout(60)

# Long enough that a job nobody cancels is still running when the test looks (10 s at 0.01 s a
# step), short enough that a failing test ends in seconds.
LONG_STEPS = 1000


class FakeRequest:
    """What `Generation.outcomes` reads of a request: the ASGI `receive` that reports a hang-up."""

    def __init__(self) -> None:
        self.hung_up = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.hung_up.wait()
        return {"type": "http.disconnect"}

    def as_request(self) -> Request[Any, Any, Any]:
        return cast(Request[Any, Any, Any], self)


def wait_until_idle(pool: InferencePool) -> None:
    """Every job has left the pool: run, stopped or skipped."""
    deadline = time.monotonic() + WAIT
    while (snapshot := pool.snapshot()).running or snapshot.queue_depth:
        assert time.monotonic() < deadline, f"jobs still in the pool: {snapshot}"
        time.sleep(0.01)


def started(engines: list[FakeEngine]) -> list[str]:
    return [prompt for engine in engines for prompt in engine.started]


def completed(engines: list[FakeEngine]) -> list[str]:
    return [prompt for engine in engines for prompt in engine.completed]


async def collect(request: Generation) -> list[object]:
    return [event async for event in request.stream()]


async def finish(request: Generation, path: str) -> None:
    """Await every image the way an API does: as a plain answer, or as an event stream."""
    if path == "outcomes":
        await request.outcomes(FakeRequest().as_request())
    else:
        await collect(request)


def assert_cancelled(jobs: list[Job]) -> None:
    """Queued jobs are skipped, running ones stop at their next step."""
    assert [job.cancelled.is_set() for job in jobs] == [True] * len(jobs)
    assert [job.future.cancelled() for job in jobs] == [True] * len(jobs)


@pytest.mark.parametrize("path", ["outcomes", "stream"])
def test_one_failed_image_cancels_the_other_images_of_its_request(path: str) -> None:
    engines = [FakeEngine(step_seconds=0.01), FakeEngine(step_seconds=0.01)]
    with running_pool(engines) as pool:

        async def scenario() -> Generation:
            # One thread takes the long image, the other the failing one; the third waits.
            request = submit(
                pool,
                [
                    params("long sibling", steps=LONG_STEPS),
                    params("fail at once"),
                    params("queued sibling", steps=LONG_STEPS),
                ],
                request_id="partial",
                timeout=60,
            )
            with pytest.raises(GenerationFailedError):
                await finish(request, path)
            return request

        request = asyncio.run(scenario())
        assert_cancelled([request.jobs[0], request.jobs[2]])
        wait_until_idle(pool)
    assert completed(engines) == []
    # The long sibling stopped at its next step; the queued one was skipped, or stopped at its
    # first step if a thread took it in the instant before the cancellation.
    assert sum(engine.steps_run for engine in engines) < 2 * LONG_STEPS // 10


def test_a_hang_up_cancels_every_job_running_or_queued() -> None:
    gate = threading.Event()
    engine = FakeEngine(step_seconds=0.01, gate=gate)
    with running_pool([engine]) as pool:

        async def scenario() -> Generation:
            request = submit(
                pool,
                [params(f"image {index}", steps=LONG_STEPS) for index in range(3)],
                request_id="gone",
                timeout=60,
            )
            client = FakeRequest()
            waiting = asyncio.ensure_future(request.outcomes(client.as_request()))
            # Image 0 holds the only thread (at the gate), images 1 and 2 wait in the queue.
            assert await asyncio.to_thread(engine.running.wait, WAIT)
            client.hung_up.set()
            with pytest.raises(JobCancelledError):
                await asyncio.wait_for(waiting, WAIT)
            return request

        request = asyncio.run(scenario())
        assert_cancelled(request.jobs)
        gate.set()
        wait_until_idle(pool)
    # The running image stopped at its first step; the queued ones never reached the engine.
    assert engine.started == ["image 0"]
    assert engine.steps_run == 1
    assert engine.completed == []


@pytest.mark.parametrize("path", ["outcomes", "stream"])
def test_the_deadline_backstop_answers_504_when_a_step_never_ends(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker checks deadlines between steps; a step that never ends (a stuck decode) is
    answered by the request's own deadline, counted like the worker's, and its jobs cancelled."""
    # The grace lets the worker answer first; the backstop only matters once it has passed.
    monkeypatch.setattr(generation, "DEADLINE_GRACE_SECONDS", 0.1)
    gate = threading.Event()  # never opened while the request waits: the first step hangs
    observer = RecordingObserver()
    engine = FakeEngine(step_seconds=0.01, gate=gate)
    with running_pool([engine], observer=observer) as pool:

        async def scenario() -> tuple[Generation, float]:
            request = submit(
                pool,
                [params("stuck"), params("queued behind it")],
                request_id="late",
                timeout=0.2,
            )
            began = time.monotonic()
            with pytest.raises(DeadlineExceededError) as raised:
                await finish(request, path)
            assert raised.value.status_code == 504
            return request, time.monotonic() - began

        request, seconds = asyncio.run(scenario())
        assert 0.3 <= seconds < WAIT
        assert observer.rejected == ["deadline"]
        assert_cancelled(request.jobs)
        gate.set()
        wait_until_idle(pool)
    assert engine.completed == []
    assert engine.started == ["stuck"]


def test_the_stream_reports_every_step_and_image_of_every_job() -> None:
    engines = [FakeEngine(step_seconds=0.001), FakeEngine(step_seconds=0.001)]
    with running_pool(engines) as pool:

        async def scenario() -> list[object]:
            request = submit(
                pool,
                [params("first", steps=3, seed=7), params("second", steps=2, seed=8)],
                request_id="watched",
                timeout=60,
                watch=True,
            )
            return await collect(request)

        events = asyncio.run(scenario())
    steps = sorted((e.index, e.steps_done, e.total) for e in events if isinstance(e, StepDone))
    assert steps == [(0, 1, 3), (0, 2, 3), (0, 3, 3), (1, 1, 2), (1, 2, 2)]
    images = {e.index: e.outcome.result.image for e in events if isinstance(e, ImageDone)}
    assert sorted(images) == [0, 1]
    # Each finished image is its own job's: the fake engine shades it by the seed.
    assert [images[index].getpixel((0, 0)) for index in (0, 1)] == [(7, 0, 248), (8, 0, 247)]
    # Every step of an image is reported before the image itself.
    for index in (0, 1):
        done_at = next(
            i for i, e in enumerate(events) if isinstance(e, ImageDone) and e.index == index
        )
        last_step = max(
            i for i, e in enumerate(events) if isinstance(e, StepDone) and e.index == index
        )
        assert last_step < done_at
