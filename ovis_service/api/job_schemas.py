"""The job as clients read it (`GET /jobs/{id}`, the 202 of an async request, the final event,
the webhook's body), made from a store record."""

import msgspec

from ovis_service.store.records import ImageRecord, JobRecord


class JobProgress(msgspec.Struct, kw_only=True):
    step: int  # denoising steps done, over all the job's images
    total: int


class JobImage(msgspec.Struct, kw_only=True):
    url: str  # a capability URL: fetchable without the API key until the job expires
    seed: int
    format: str


class JobError(msgspec.Struct, kw_only=True):
    message: str
    code: str


class JobParameters(msgspec.Struct, kw_only=True):
    prompt: str
    negative_prompt: str
    num_inference_steps: int
    cfg_scale: float
    width: int
    height: int
    n: int
    seeds: list[int]  # one per image, drawn by the server where the request named none
    format: str


class Job(msgspec.Struct, kw_only=True):
    id: str
    object: str = "job"
    status: str  # queued, running, succeeded, failed or cancelled
    api: str  # which API made it: native or openai
    created_at: int  # Unix seconds
    started_at: int | None = None
    finished_at: int | None = None
    expires_at: int | None = None  # the job and its images are gone from this moment
    parameters: JobParameters
    progress: JobProgress | None = None
    images: list[JobImage] = msgspec.field(default_factory=list)
    error: JobError | None = None
    webhook: str | None = None


class JobList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[Job]
    has_more: bool
    # Pass as `?after=` for the next page; null on the last one.
    next_cursor: str | None = None


def image_url(base_url: str, image: ImageRecord) -> str:
    """Where anyone holding it fetches a stored image."""
    return f"{base_url}/images/{image.token}.{image.image_format}"


def job_view(record: JobRecord, base_url: str) -> Job:
    params = record.request["params"]
    first = params[0]
    image_format = record.request.get("format", "png")
    progress = None
    if record.progress_total is not None and record.progress_step is not None:
        progress = JobProgress(step=record.progress_step, total=record.progress_total)
    error = None
    if record.error_message is not None:
        error = JobError(message=record.error_message, code=record.error_code or "failed")
    return Job(
        id=record.id,
        status=record.status.value,
        api=record.api,
        created_at=int(record.created_at),
        started_at=_seconds(record.started_at),
        finished_at=_seconds(record.finished_at),
        expires_at=_seconds(record.expires_at),
        parameters=JobParameters(
            prompt=first["prompt"],
            negative_prompt=first.get("negative_prompt", ""),
            num_inference_steps=first["num_inference_steps"],
            cfg_scale=first["cfg_scale"],
            width=first["width"],
            height=first["height"],
            n=len(params),
            seeds=[p["seed"] for p in params],
            format=image_format,
        ),
        progress=progress,
        images=[
            JobImage(
                url=image_url(base_url, image),
                seed=image.seed,
                format=image.image_format,
            )
            for image in record.images
        ],
        error=error,
        webhook=record.webhook,
    )


def _seconds(value: float | None) -> int | None:
    return None if value is None else int(value)
