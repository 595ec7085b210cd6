"""What the inference threads hand the event loop: a job's answer crosses threads only through
the loop, a request that went away is never answered twice, and the snapshot's derived fields
(`status`, `threads_alive`) that /health reports."""

import asyncio
import dataclasses
import math
import threading
from typing import Any

import pytest
from PIL import Image

from ovis_service.engine import GenerationResult
from ovis_service.errors import GenerationFailedError
from ovis_service.schemas import GenerationParams
from ovis_service.worker.types import (
    Job,
    JobOutcome,
    ThreadSnapshot,
    WorkerSnapshot,
    WorkerState,
)
from tests.support.worker import WAIT

OUTCOME = JobOutcome(
    result=GenerationResult(image=Image.new("RGB", (16, 16)), prompt_truncated=False),
    queue_seconds=0.5,
    generation_seconds=2.0,
)


def job_on(
    loop: asyncio.AbstractEventLoop, steps: int = 2, width: int = 256, height: int = 256
) -> Job:
    return Job(
        request_id="req",
        params=GenerationParams(
            prompt="a fox", num_inference_steps=steps, width=width, height=height
        ),
        future=loop.create_future(),
        loop=loop,
        deadline=math.inf,
        enqueued_at=0.0,
    )


def resolve_from_another_thread(job: Job, outcome: JobOutcome | BaseException) -> None:
    thread = threading.Thread(target=job.resolve, args=(outcome,))
    thread.start()
    thread.join(WAIT)


def test_an_answer_from_another_thread_is_settled_on_the_loop() -> None:
    async def scenario() -> None:
        job = job_on(asyncio.get_running_loop())
        resolve_from_another_thread(job, OUTCOME)
        # Handed over, not set from the inference thread: asyncio futures are not thread-safe.
        assert not job.future.done()
        assert await asyncio.wait_for(job.future, WAIT) is OUTCOME

    asyncio.run(scenario())


def test_an_error_from_another_thread_is_raised_to_the_awaiting_handler() -> None:
    async def scenario() -> None:
        job = job_on(asyncio.get_running_loop())
        resolve_from_another_thread(job, GenerationFailedError())
        with pytest.raises(GenerationFailedError):
            await asyncio.wait_for(job.future, WAIT)

    asyncio.run(scenario())


def test_a_request_that_went_away_or_was_answered_is_not_answered_again() -> None:
    """A client that hangs up cancels its future before the thread's answer lands; setting it
    then would raise InvalidStateError on the loop, where nobody would see it but the log."""
    loop_errors: list[dict[str, Any]] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: loop_errors.append(context))
        gone, answered = job_on(loop), job_on(loop)
        gone.future.cancel()
        resolve_from_another_thread(gone, OUTCOME)
        resolve_from_another_thread(answered, OUTCOME)
        resolve_from_another_thread(answered, GenerationFailedError())
        assert await asyncio.wait_for(answered.future, WAIT) is OUTCOME
        await asyncio.sleep(0)  # let every handed-over callback run
        assert gone.future.cancelled()

    asyncio.run(scenario())
    assert loop_errors == []


def test_an_answer_for_a_closed_loop_is_dropped_quietly() -> None:
    """At shutdown the loop may be gone before a thread finishes; nobody is waiting any more,
    and the thread must not die of it."""
    loop = asyncio.new_event_loop()
    job = job_on(loop)
    loop.close()
    job.resolve(OUTCOME)
    assert not job.future.done()


def test_a_job_is_abandoned_once_cancelled_or_once_nobody_awaits_it() -> None:
    loop = asyncio.new_event_loop()
    try:
        waiting, cancelled, forgotten = job_on(loop), job_on(loop), job_on(loop)
        cancelled.cancel()
        forgotten.future.cancel()
        assert (waiting.abandoned, cancelled.abandoned, forgotten.abandoned) == (
            False,
            True,
            True,
        )
    finally:
        loop.close()


def test_work_grows_with_steps_and_pixels() -> None:
    """Retry-After adds up `work`: twice the steps or twice the pixels is twice the wait."""
    loop = asyncio.new_event_loop()
    try:
        base = job_on(loop, steps=10, width=512, height=512).work
        assert job_on(loop, steps=20, width=512, height=512).work == 2 * base
        assert job_on(loop, steps=10, width=1024, height=512).work == 2 * base
        assert job_on(loop, steps=10, width=1024, height=1024).work == 4 * base
    finally:
        loop.close()


def thread(state: WorkerState, request_id: str | None = None) -> ThreadSnapshot:
    return ThreadSnapshot(
        index=0,
        device="cpu",
        state=state,
        request_id=request_id,
        steps_done=None if request_id is None else 3,
        total_steps=None if request_id is None else 20,
    )


@pytest.mark.parametrize(
    ("snapshot", "status"),
    [
        (thread(WorkerState.READY, "req-7"), "busy"),
        (thread(WorkerState.DRAINING, "req-7"), "busy"),
        (thread(WorkerState.READY), "ready"),
        (thread(WorkerState.LOADING), "loading"),
        (thread(WorkerState.DEAD), "dead"),
    ],
)
def test_a_thread_running_a_job_reads_busy_otherwise_its_state(
    snapshot: ThreadSnapshot, status: str
) -> None:
    assert snapshot.status == status


def test_only_loading_and_ready_threads_count_as_alive() -> None:
    """/health turns 503 when no thread is alive; a draining, stopped, failed or dead thread
    will take no more jobs."""
    snapshot = WorkerSnapshot(
        state=WorkerState.DEAD,
        queue_depth=0,
        running=0,
        capacity=4,
        info=None,
        detail=None,
        threads=tuple(thread(state) for state in WorkerState),
    )
    assert snapshot.threads_alive == 2
    assert dataclasses.replace(snapshot, threads=()).threads_alive == 0
