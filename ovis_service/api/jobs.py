"""Async jobs: `Prefer: respond-async` on either API makes a request a job (202 and a
`Location`); `/jobs` follows, lists, cancels and deletes jobs; `/images/{token}.{format}`
serves what they made to anyone holding the URL.

Jobs belong to the API key that made them: another key gets the same 404 as for a job that
never existed, so ids reveal nothing.
"""

import asyncio
import base64
import binascii
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
from litestar import Controller, MediaType, Request, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, QueryParameter
from litestar.response import ServerSentEventMessage
from sqlalchemy.exc import SQLAlchemyError

from ovis_service.api.job_schemas import Job, JobList, job_view
from ovis_service.api.streaming import EventStream
from ovis_service.auth import PUBLIC, key_owner
from ovis_service.config import Settings
from ovis_service.errors import (
    BadRequestError,
    NotFoundError,
    OverloadedError,
    StoreUnavailableError,
)
from ovis_service.generation import EncodedImage
from ovis_service.imaging import MEDIA_TYPES, ImageFormat
from ovis_service.job_runner import JobRunner
from ovis_service.schemas import ErrorResponse, GenerationParams
from ovis_service.store.job_store import JobStore
from ovis_service.store.records import ApiName, JobRecord, NewImage, NewJob
from ovis_service.webhooks import check_webhook_url
from ovis_service.worker.pool import InferencePool
from ovis_service.worker.types import WorkerState

PREFER_ASYNC = "respond-async"
_POLL_SECONDS = 0.5  # how often an event stream rereads a job running on another replica
_KEEPALIVE_SECONDS = 15.0  # a comment line, so proxies that cut idle connections do not
_PAGE_SIZE = 20
_MAX_PAGE_SIZE = 100

_NOT_FOUND = {
    404: ResponseSpec(
        data_container=ErrorResponse,
        description="No such job for this API key, or it expired.",
    )
}


def wants_async(request: Request[Any, Any, Any]) -> bool:
    """RFC 7240: `Prefer: respond-async`, possibly among other preferences."""
    for header in request.headers.getall("prefer", []):
        for preference in header.split(","):
            name = preference.split(";")[0].split("=")[0].strip().lower()
            if name == PREFER_ASYNC:
                return True
    return False


def public_base(request: Request[Any, Any, Any], settings: Settings) -> str:
    """Where clients reach this service: OVIS_PUBLIC_URL behind a proxy, else the request's
    own scheme and host."""
    return (settings.public_url or str(request.base_url)).rstrip("/")


async def check_webhook(url: str, settings: Settings) -> None:
    if not settings.webhook_secret:
        raise BadRequestError(
            "webhook: this service has no OVIS_WEBHOOK_SECRET, so it cannot sign webhooks; "
            "poll GET /jobs/{id} or its events instead, or ask the operator to set one",
            param="webhook",
        )
    # Resolving a name blocks; it connects to nothing.
    await asyncio.to_thread(check_webhook_url, url, settings.webhook_allowed_hosts)


async def accept_job(
    request: Request[Any, Any, Any],
    *,
    api: ApiName,
    params: list[GenerationParams],
    image_format: ImageFormat,
    quality: int | None,
    webhook: str | None,
    store: JobStore,
    runner: JobRunner,
    worker: InferencePool,
    settings: Settings,
) -> Response[Job]:
    """Commit the job, then answer 202; the runner starts it when a thread is free."""
    if len(params) > worker.places:
        # The pool could never take all its images at once, so it would wait for ever.
        raise BadRequestError(
            f"n: this service runs at most {worker.places} images at once (inference threads "
            f"plus OVIS_QUEUE_SIZE); ask for {worker.places} or fewer",
            param="n",
        )
    if webhook is not None:
        await check_webhook(webhook, settings)
    new = NewJob(
        owner=key_owner(request, settings.api_keys),
        api=api,
        request={
            "params": [msgspec.to_builtins(p) for p in params],
            "format": image_format,
            "quality": quality,
        },
        base_url=public_base(request, settings),
        webhook=webhook,
    )
    try:
        pending = await asyncio.to_thread(store.count_queued)
        if pending >= settings.max_pending_jobs:
            raise worker.count_rejection(
                OverloadedError(
                    f"the job backlog is full ({pending} jobs waiting, the most is "
                    f"{settings.max_pending_jobs}); retry later",
                    retry_after=max(1, worker.retry_after()),
                )
            )
        record = await asyncio.to_thread(store.create, new)
    except SQLAlchemyError:
        raise _store_down() from None
    runner.wake()
    return Response(
        job_view(record, new.base_url),
        status_code=202,
        media_type=MediaType.JSON,  # `/generate` declares image/png for its usual answer
        headers={"Location": f"/jobs/{record.id}", "Preference-Applied": PREFER_ASYNC},
    )


async def store_images(
    request: Request[Any, Any, Any],
    images: list[EncodedImage],
    image_format: ImageFormat,
    *,
    store: JobStore,
    settings: Settings,
) -> JobRecord:
    """Keep a synchronous request's images for `response_format: "url"`: as a finished job of
    the caller's, so they expire, list and delete like any job's."""
    new = NewJob(
        owner=key_owner(request, settings.api_keys),
        api="openai",
        request={
            "params": [msgspec.to_builtins(image.params) for image in images],
            "format": image_format,
            "quality": None,
        },
        base_url=public_base(request, settings),
    )
    files = [
        NewImage(
            index=image.index,
            seed=image.params.seed,
            image_format=image_format,
            media_type=MEDIA_TYPES[image_format],
            data=image.data,
        )
        for image in images
    ]
    try:
        return await asyncio.to_thread(store.create_finished, new, files)
    except SQLAlchemyError:
        raise _store_down() from None


def refuse_webhook_without_job(webhook: str | None) -> None:
    if webhook is not None:
        raise BadRequestError(
            "webhook: a webhook is sent when a job finishes; send the request with "
            "`Prefer: respond-async` to make it a job",
            param="webhook",
        )


class JobsController(Controller):
    path = "/jobs"

    @get("/", summary="Your jobs, newest first")
    async def list_jobs(
        self,
        request: Request[Any, Any, Any],
        store: NamedDependency[JobStore],
        settings: NamedDependency[Settings],
        limit: Annotated[int, QueryParameter(ge=1, le=_MAX_PAGE_SIZE)] = _PAGE_SIZE,
        after: Annotated[str | None, QueryParameter(max_length=200)] = None,
    ) -> JobList:
        """Jobs made with this API key that have not expired. Follow `next_cursor` with
        `?after=` for the next page."""
        before = _decode_cursor(after) if after else None
        owner = key_owner(request, settings.api_keys)
        records = await _read(store.owned_by, owner, limit=limit + 1, before=before)
        base = public_base(request, settings)
        page = records[:limit]
        more = len(records) > limit
        return JobList(
            data=[job_view(record, base) for record in page],
            has_more=more,
            next_cursor=_encode_cursor(page[-1]) if more else None,
        )

    @get("/{job_id:str}", summary="One job", responses=_NOT_FOUND)
    async def get_job(
        self,
        job_id: FromPath[str],
        *,
        request: Request[Any, Any, Any],
        store: NamedDependency[JobStore],
        settings: NamedDependency[Settings],
    ) -> Job:
        record = await _owned(store, job_id, request, settings)
        return job_view(record, public_base(request, settings))

    @get(
        "/{job_id:str}/events",
        summary="Follow a job: progress events, then the finished job",
        responses=_NOT_FOUND,
        media_type="text/event-stream",
    )
    async def job_events(
        self,
        job_id: FromPath[str],
        *,
        request: Request[Any, Any, Any],
        store: NamedDependency[JobStore],
        runner: NamedDependency[JobRunner],
        worker: NamedDependency[InferencePool],
        settings: NamedDependency[Settings],
    ) -> EventStream:
        """`progress` {step, total} after each step, then `done` with the job as `GET
        /jobs/{id}` shows it; a finished job sends `done` at once."""
        record = await _owned(store, job_id, request, settings)
        owner = key_owner(request, settings.api_keys)
        events = _follow(
            record,
            owner=owner,
            store=store,
            runner=runner,
            worker=worker,
            base=public_base(request, settings),
        )
        return EventStream(events)

    @post("/{job_id:str}/cancel", status_code=200, summary="Cancel a job", responses=_NOT_FOUND)
    async def cancel_job(
        self,
        job_id: FromPath[str],
        *,
        request: Request[Any, Any, Any],
        store: NamedDependency[JobStore],
        runner: NamedDependency[JobRunner],
        settings: NamedDependency[Settings],
    ) -> Job:
        """A queued job is cancelled at once, a running one at its next step (the answer then
        still says `running`; follow the job to see it end). A finished job is left as it is."""
        owner = key_owner(request, settings.api_keys)
        record = await _read(store.cancel, job_id, owner)
        if record is None:
            raise _not_found(job_id)
        runner.cancel_here(job_id)
        runner.finished_elsewhere(record)
        return job_view(record, public_base(request, settings))

    @delete("/{job_id:str}", status_code=204, summary="Delete a job", responses=_NOT_FOUND)
    async def delete_job(
        self,
        job_id: FromPath[str],
        *,
        request: Request[Any, Any, Any],
        store: NamedDependency[JobStore],
        runner: NamedDependency[JobRunner],
        settings: NamedDependency[Settings],
    ) -> None:
        """Cancel the job if it has not finished, then forget it and delete its images."""
        if not await _read(store.delete, job_id, key_owner(request, settings.api_keys)):
            raise _not_found(job_id)
        runner.cancel_here(job_id)


class ImagesController(Controller):
    path = "/images"

    @get(
        "/{name:str}",
        opt={PUBLIC: True},  # the URL itself is the credential
        summary="An image a job made",
        media_type="image/png",
        responses={404: ResponseSpec(data_container=ErrorResponse, description="No such image.")},
    )
    async def get_image(
        self, name: FromPath[str], store: NamedDependency[JobStore]
    ) -> Response[bytes]:
        """The same bytes and metadata a synchronous request returns. No API key: anyone with
        the URL can fetch it until its job expires."""
        token, _, extension = name.partition(".")
        image = await _read(store.image, token)
        if image is None or not image.media_type.endswith("/" + extension.replace("jpg", "jpeg")):
            raise NotFoundError("no such image; it may have expired with its job")
        return Response(
            image.data,
            media_type=image.media_type,
            headers={
                "X-Seed": str(image.seed),
                # The bytes behind a token never change; only the job's expiry ends them.
                "Cache-Control": "private, max-age=3600, immutable",
                "X-Content-Type-Options": "nosniff",
            },
        )


async def _follow(
    record: JobRecord,
    *,
    owner: str,
    store: JobStore,
    runner: JobRunner,
    worker: InferencePool,
    base: str,
) -> AsyncIterator[ServerSentEventMessage]:
    steps = runner.listen(record.id)
    sent: tuple[int, int] | None = None
    last_sent = time.monotonic()
    try:
        current: JobRecord | None = record
        while True:
            if current is None:
                yield _event("error", {"detail": "the job was deleted"})
                return
            if current.status.finished:
                yield _event("done", msgspec.to_builtins(job_view(current, base)))
                return
            if worker.snapshot().state not in (WorkerState.READY, WorkerState.LOADING):
                return  # shutting down: the client reconnects to whichever replica is up
            progress = (current.progress_step, current.progress_total)
            if progress[0] is not None and progress[1] is not None and progress != sent:
                sent = (progress[0], progress[1])
                last_sent = time.monotonic()
                yield _event("progress", {"step": sent[0], "total": sent[1]})
            # Steps of a job running here arrive as they happen; otherwise reread the store.
            deadline = time.monotonic() + _POLL_SECONDS
            while (remaining := deadline - time.monotonic()) > 0:
                try:
                    step = await asyncio.wait_for(steps.get(), timeout=remaining)
                except TimeoutError:
                    break
                if step is None:
                    break  # its outcome is stored: read it now
                if step != sent:
                    sent, last_sent = step, time.monotonic()
                    yield _event("progress", {"step": step[0], "total": step[1]})
            if time.monotonic() - last_sent > _KEEPALIVE_SECONDS:
                last_sent = time.monotonic()
                yield ServerSentEventMessage(comment="keep-alive")
            current = await _read(store.get, record.id, owner)
    finally:
        runner.unlisten(record.id, steps)


def _event(name: str, payload: dict[str, Any]) -> ServerSentEventMessage:
    return ServerSentEventMessage(event=name, data=json.dumps(payload, separators=(",", ":")))


async def _owned(
    store: JobStore, job_id: str, request: Request[Any, Any, Any], settings: Settings
) -> JobRecord:
    record: JobRecord | None = await _read(store.get, job_id, key_owner(request, settings.api_keys))
    if record is None:
        raise _not_found(job_id)
    return record


async def _read(function: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a store call off the event loop; a database that is down is a 503, not a 500."""
    try:
        return await asyncio.to_thread(function, *args, **kwargs)
    except SQLAlchemyError:
        raise _store_down() from None


def _store_down() -> StoreUnavailableError:
    return StoreUnavailableError(
        "the job store cannot be reached or written (disk full, database down); retry later",
        retry_after=5,
    )


def _not_found(job_id: str) -> NotFoundError:
    return NotFoundError(
        f"no job {job_id!r} for this API key; it may have expired or been deleted",
        param="job_id",
    )


def _encode_cursor(record: JobRecord) -> str:
    raw = json.dumps([record.created_at, record.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        created_at, job_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return float(created_at), str(job_id)
    except (ValueError, TypeError, binascii.Error):
        raise BadRequestError(
            "after: not a cursor this service gave out; pass `next_cursor` from the previous "
            "page as it is",
            param="after",
        ) from None
