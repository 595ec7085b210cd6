"""`Prefer: respond-async` (RFC 7240): how a request to either API becomes a job, committed to
the store before its 202 goes out; and `response_format: "url"`, which keeps a synchronous
request's images as a finished job so they have URLs."""

import asyncio
from typing import Any

import msgspec
from litestar import MediaType, Request, Response
from sqlalchemy.exc import SQLAlchemyError

from ovis_service.api.job_schemas import Job, job_view
from ovis_service.auth import key_owner
from ovis_service.config import Settings
from ovis_service.errors import (
    BadRequestError,
    NotReadyError,
    OverloadedError,
    StoreUnavailableError,
)
from ovis_service.generation import EncodedImage
from ovis_service.imaging import ImageFormat
from ovis_service.job_runner import JobRunner, image_files
from ovis_service.schemas import GenerationParams
from ovis_service.store.job_store import JobStore
from ovis_service.store.records import ApiName, JobRecord, NewJob
from ovis_service.webhooks import check_webhook_url
from ovis_service.worker.pool import InferencePool
from ovis_service.worker.types import WorkerState

PREFER_ASYNC = "respond-async"


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
    state = worker.snapshot().state
    if state in (WorkerState.FAILED, WorkerState.DEAD):
        # Nothing here would ever run it; a replica with a model is what the client needs.
        raise worker.count_rejection(
            NotReadyError("the model is not available on this replica; retry another")
        )
    if len(params) > worker.places:
        # The pool could never take all its images at once, so it would wait for ever.
        raise BadRequestError(
            f"n: this service runs at most {worker.places} images at once (inference threads "
            f"plus OVIS_QUEUE_SIZE); ask for {worker.places} or fewer",
            param="n",
        )
    if webhook is not None:
        await check_webhook(webhook, settings)
    new = _new_job(
        request,
        settings,
        api=api,
        params=params,
        image_format=image_format,
        quality=quality,
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
        raise store_unavailable() from None
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
    params = [image.params for image in images]
    new = _new_job(request, settings, api="openai", params=params, image_format=image_format)
    files = image_files(images, image_format)
    try:
        return await asyncio.to_thread(store.create_finished, new, files)
    except SQLAlchemyError:
        raise store_unavailable() from None


def _new_job(
    request: Request[Any, Any, Any],
    settings: Settings,
    *,
    api: ApiName,
    params: list[GenerationParams],
    image_format: ImageFormat,
    quality: int | None = None,
    webhook: str | None = None,
) -> NewJob:
    """The job as the store keeps it: the caller's key digest, the parameters of each image
    and how they are written, and where its image URLs point."""
    return NewJob(
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


def refuse_webhook_without_job(webhook: str | None) -> None:
    if webhook is not None:
        raise BadRequestError(
            "webhook: a webhook is sent when a job finishes; send the request with "
            "`Prefer: respond-async` to make it a job",
            param="webhook",
        )


async def read_store(function: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a store call off the event loop; a database that is down is a 503, not a 500."""
    try:
        return await asyncio.to_thread(function, *args, **kwargs)
    except SQLAlchemyError:
        raise store_unavailable() from None


def store_unavailable() -> StoreUnavailableError:
    return StoreUnavailableError(
        "the job store cannot be reached or written (disk full, database down); retry later",
        retry_after=5,
    )
