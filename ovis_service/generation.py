"""From a request to its jobs and from their outcomes to image files: the one path every API
shares.

A request becomes one job per image. Each job goes through the one bounded queue, so queue depth,
Retry-After, deadlines and cancellation stay per image, and with several inference threads the
images of one request run side by side. The pool never knows which API asked; each API only
translates its body into `GenerationParams` and the finished `EncodedImage`s into its answer.
"""

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import structlog
from litestar import Request
from PIL import Image

from ovis_service.config import Settings
from ovis_service.errors import DeadlineExceededError, JobCancelledError
from ovis_service.imaging import ImageFormat, encode_image
from ovis_service.model_source import public_model_name
from ovis_service.schemas import GenerationParams
from ovis_service.worker.pool import InferencePool
from ovis_service.worker.types import Job, JobOutcome

logger = structlog.get_logger(__name__)

# The worker enforces the deadline between denoising steps; this grace lets it answer first.
DEADLINE_GRACE_SECONDS = 5.0


@dataclass(frozen=True)
class Encoding:
    """How a request's images become files: format, quality, and what their metadata names."""

    image_format: ImageFormat
    quality: int
    model_name: str
    levers: Mapping[str, str]

    async def encode(self, image: Image.Image, params: GenerationParams) -> bytes:
        """Off both the event loop and the inference thread (busy with the next job): a large
        PNG takes a good part of a second."""
        return await asyncio.to_thread(
            encode_image,
            image,
            params,
            self.model_name,
            image_format=self.image_format,
            quality=self.quality,
            levers=self.levers,
        )


def encoding_for(
    worker: InferencePool,
    settings: Settings,
    image_format: ImageFormat,
    quality: int | None = None,
) -> Encoding:
    """How this request's images are written: the configured quality unless the request chose
    one, the public model name and the speed levers the loaded engine reports."""
    info = worker.snapshot().info
    return Encoding(
        image_format=image_format,
        quality=quality if quality is not None else settings.quality_for(image_format),
        model_name=public_model_name(settings.model),
        levers=info.levers if info is not None else {},
    )


@dataclass(frozen=True)
class EncodedImage:
    index: int  # which image of the request
    data: bytes
    params: GenerationParams
    outcome: JobOutcome
    encode_seconds: float


@dataclass(frozen=True)
class StepDone:
    index: int  # which image of the request
    steps_done: int
    total: int


@dataclass(frozen=True)
class PreviewReady:
    index: int
    steps_done: int
    image: Image.Image


@dataclass(frozen=True)
class ImageDone:
    index: int
    outcome: JobOutcome


StreamEvent = StepDone | PreviewReady | ImageDone


class Generation:
    """One request's jobs, from the queue to their outcomes."""

    def __init__(
        self,
        worker: InferencePool,
        jobs: list[Job],
        timeout: float,
        events: "asyncio.Queue[StreamEvent | _JobFailed]",
    ) -> None:
        self._worker = worker
        self.jobs = jobs
        self.timeout = timeout
        self._events = events

    @property
    def params(self) -> list[GenerationParams]:
        return [job.params for job in self.jobs]

    async def encoded(
        self, request: Request[Any, Any, Any], encoding: Encoding, log_fields: dict[str, object]
    ) -> list[EncodedImage]:
        """Every image, awaited as `outcomes` does, then encoded and logged, in order."""
        outcomes = await self.outcomes(request)
        return [
            await finish_image(index, outcome, job.params, encoding, log_fields)
            for index, (outcome, job) in enumerate(zip(outcomes, self.jobs, strict=True))
        ]

    def cancel(self) -> None:
        """Queued jobs are skipped, running ones stop at their next step."""
        for job in self.jobs:
            job.cancel()
            job.future.cancel()

    async def outcomes(self, request: Request[Any, Any, Any]) -> list[JobOutcome]:
        """Every image, in order. A hang-up or the deadline cancels them all; the first job
        error is raised."""
        disconnect = asyncio.ensure_future(_wait_for_disconnect(request))
        futures = [job.future for job in self.jobs]
        try:
            gathered: asyncio.Future[list[JobOutcome]] = asyncio.gather(*futures)
            waiters: set[asyncio.Future[Any]] = {gathered, disconnect}
            done, _ = await asyncio.wait(
                waiters, timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if gathered in done:
                return gathered.result()
            self.cancel()
            gathered.cancel()
            if disconnect in done:
                raise JobCancelledError("the client disconnected")
            raise self._deadline_passed()
        except BaseException:
            self.cancel()
            raise
        finally:
            disconnect.cancel()

    def _deadline_passed(self) -> DeadlineExceededError:
        # The worker enforces deadlines between steps and counts those; this is the backstop
        # for a step that never ends (a stuck decode), counted the same way.
        error = DeadlineExceededError("the request deadline passed")
        self._worker.count_rejection(error)
        return error

    async def stream(self) -> AsyncIterator[StreamEvent]:
        """Progress, previews and finished images as they happen. Leaving the iteration early
        (the client hung up and the server cancelled the stream) cancels the jobs."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        for index, job in enumerate(self.jobs):
            job.future.add_done_callback(partial(_job_finished, self._events, index))
        pending = len(self.jobs)
        try:
            while pending:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise self._deadline_passed()
                try:
                    event = await asyncio.wait_for(self._events.get(), timeout=remaining)
                except TimeoutError:
                    raise self._deadline_passed() from None
                if isinstance(event, _JobFailed):
                    raise event.error
                if isinstance(event, ImageDone):
                    pending -= 1
                yield event
        finally:
            self.cancel()


async def finish_image(
    index: int,
    outcome: JobOutcome,
    params: GenerationParams,
    encoding: Encoding,
    log_fields: dict[str, object],
    **log_extra: object,
) -> EncodedImage:
    """Encode one finished image and write its `request_completed` line."""
    started = time.perf_counter()
    data = await encoding.encode(outcome.result.image, params)
    encode_seconds = time.perf_counter() - started
    logger.info(
        "request_completed",
        status=200,
        queue_s=round(outcome.queue_seconds, 4),
        generation_s=round(outcome.generation_seconds, 4),
        encode_s=round(encode_seconds, 4),
        prompt_truncated=outcome.result.prompt_truncated,
        format=encoding.image_format,
        image_index=index,
        **log_fields,
        **log_extra,
    )
    return EncodedImage(index, data, params, outcome, encode_seconds)


@dataclass(frozen=True)
class _JobFailed:
    index: int
    error: BaseException


def _job_finished(
    events: "asyncio.Queue[StreamEvent | _JobFailed]",
    index: int,
    future: "asyncio.Future[JobOutcome]",
) -> None:
    if future.cancelled():
        events.put_nowait(_JobFailed(index, JobCancelledError("the job was cancelled")))
    elif (error := future.exception()) is not None:
        events.put_nowait(_JobFailed(index, error))
    else:
        events.put_nowait(ImageDone(index, future.result()))


def submit(
    worker: InferencePool,
    params: Sequence[GenerationParams],
    *,
    request_id: str,
    timeout: float,
    watch: bool = False,
    preview_steps: frozenset[int] = frozenset(),
) -> Generation:
    """Queue one job per image, all or none (a full queue raises `OverloadedError`).

    With `watch`, the inference thread reports each step (and previews at `preview_steps`) to
    the event loop, for `Generation.stream`.
    """
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[StreamEvent | _JobFailed] = asyncio.Queue()
    now = time.monotonic()
    jobs = []
    for index, job_params in enumerate(params):
        job = Job(
            request_id=request_id,
            params=job_params,
            future=loop.create_future(),
            loop=loop,
            deadline=now + timeout,
            enqueued_at=now,
        )
        if watch:
            job.on_progress = _threadsafe_put(loop, events, partial(StepDone, index))
            job.preview_steps = preview_steps
            job.on_preview = _threadsafe_put(loop, events, partial(PreviewReady, index))
        jobs.append(job)
    worker.submit_all(jobs)
    return Generation(worker, jobs, timeout + DEADLINE_GRACE_SECONDS, events)


def _threadsafe_put(
    loop: asyncio.AbstractEventLoop,
    events: "asyncio.Queue[StreamEvent | _JobFailed]",
    make: Callable[..., StreamEvent],
) -> Callable[..., None]:
    """A callback for the inference thread that hands an event to the event loop."""

    def put(*args: Any) -> None:
        # A closed loop means nobody is listening any more.
        try:
            loop.call_soon_threadsafe(events.put_nowait, make(*args))
        except RuntimeError:
            return

    return put


async def _wait_for_disconnect(request: Request[Any, Any, Any]) -> None:
    """Returns when the client hangs up. The body has been read, so the next ASGI message the
    server sends is `http.disconnect`."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
