"""Following async jobs: `/jobs` shows, streams, lists, cancels and deletes them, and
`/images/{token}.{format}` serves what they made to anyone holding the URL. (How a request
becomes a job is in `respond_async`.)

Jobs belong to the API key that made them: another key gets the same 404 as for a job that
never existed, so ids reveal nothing.
"""

import asyncio
import base64
import binascii
import json
import math
import re
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, QueryParameter
from litestar.response import ServerSentEventMessage

from ovis_service.api.job_schemas import Job, JobList, job_view
from ovis_service.api.respond_async import public_base, read_store
from ovis_service.api.streaming import EventStream
from ovis_service.auth import PUBLIC, key_owner
from ovis_service.config import Settings
from ovis_service.errors import (
    BadRequestError,
    NotFoundError,
)
from ovis_service.job_runner import JobRunner
from ovis_service.schemas import ErrorResponse
from ovis_service.store.job_store import JobStore
from ovis_service.store.records import JobRecord
from ovis_service.worker.pool import InferencePool
from ovis_service.worker.types import WorkerState

_POLL_SECONDS = 0.5  # how often an event stream rereads a job running on another replica
_KEEPALIVE_SECONDS = 15.0  # a comment line, so proxies that cut idle connections do not
_PAGE_SIZE = 20
_IDENTIFIER = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MAX_PAGE_SIZE = 100

_NOT_FOUND = {
    404: ResponseSpec(
        data_container=ErrorResponse,
        description="No such job for this API key, or it expired.",
    )
}


class JobsController(Controller):
    path = "/jobs"

    @get(
        "/",
        summary="Your jobs, newest first",
        responses={
            422: ResponseSpec(
                data_container=ErrorResponse,
                description="`limit` out of range, or `after` not a cursor this service gave out.",
            )
        },
    )
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
        records = await read_store(store.owned_by, owner, limit=limit + 1, before=before)
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
        if not _well_formed(job_id):
            raise _not_found(job_id)
        owner = key_owner(request, settings.api_keys)
        record = await read_store(store.cancel, job_id, owner)
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
        owner = key_owner(request, settings.api_keys)
        if not _well_formed(job_id) or not await read_store(store.delete, job_id, owner):
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
        image = await read_store(store.image, token) if _well_formed(token) else None
        if image is None or not image.media_type.endswith("/" + extension.replace("jpg", "jpeg")):
            raise NotFoundError("no such image; it may have expired with its job")
        return Response(
            image.data,
            media_type=image.media_type,
            headers={
                "X-Seed": str(image.seed),
                # Briefly: the bytes never change, but a deleted job's images must go soon.
                "Cache-Control": "private, max-age=60",
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
            current = await read_store(store.get, record.id, owner)
    finally:
        runner.unlisten(record.id, steps)


def _event(name: str, payload: dict[str, Any]) -> ServerSentEventMessage:
    return ServerSentEventMessage(event=name, data=json.dumps(payload, separators=(",", ":")))


async def _owned(
    store: JobStore, job_id: str, request: Request[Any, Any, Any], settings: Settings
) -> JobRecord:
    if not _well_formed(job_id):
        raise _not_found(job_id)
    record: JobRecord | None = await read_store(
        store.get, job_id, key_owner(request, settings.api_keys)
    )
    if record is None:
        raise _not_found(job_id)
    return record


def _not_found(_job_id: str) -> NotFoundError:
    # The id is not repeated: it may be anything a client put in the path.
    return NotFoundError(
        "no such job for this API key; it may have expired or been deleted", param="job_id"
    )


def _well_formed(identifier: str) -> bool:
    """Ids and image tokens are URL-safe base64; anything else is not one of ours, and never
    reaches the database (which would refuse a NUL or a lone surrogate with an error)."""
    return _IDENTIFIER.fullmatch(identifier) is not None


def _encode_cursor(record: JobRecord) -> str:
    raw = json.dumps([record.created_at, record.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        created_at, job_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if isinstance(job_id, str) and _well_formed(job_id) and math.isfinite(created_at):
            return float(created_at), job_id
    except (ValueError, TypeError, binascii.Error):
        pass
    raise BadRequestError(
        "after: not a cursor this service gave out; pass `next_cursor` from the previous page as "
        "it is",
        param="after",
    )
