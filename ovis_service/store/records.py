"""A job and its images as the store hands them out: plain frozen values, no database rows."""

import enum
from dataclasses import dataclass, field
from typing import Any, Literal

ApiName = Literal["native", "openai"]


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class WebhookStatus(str, enum.Enum):
    PENDING = "pending"  # the job has a webhook that has not been delivered yet
    DELIVERED = "delivered"
    FAILED = "failed"  # every attempt failed; the job itself is unaffected


@dataclass(frozen=True)
class ImageRecord:
    token: str  # the capability in the image's URL
    index: int
    seed: int
    image_format: str


@dataclass(frozen=True)
class StoredImage:
    """One image's file, for `GET /images/{token}`."""

    data: bytes
    media_type: str
    seed: int
    job_id: str


@dataclass(frozen=True)
class NewImage:
    index: int
    seed: int
    image_format: str
    media_type: str
    data: bytes


@dataclass(frozen=True)
class NewJob:
    """What a handler has validated: the parameters of each image, seeds drawn, and how the
    images are to be written."""

    owner: str  # a digest of the API key that made it ("" without authentication)
    api: ApiName
    request: dict[str, Any]  # JSON: {"params": [...one GenerationParams per image], ...}
    base_url: str  # where the job's image URLs point, for webhooks sent later
    webhook: str | None = None


@dataclass(frozen=True)
class JobRecord:
    id: str
    owner: str
    api: ApiName
    status: JobStatus
    created_at: float
    request: dict[str, Any]
    base_url: str
    started_at: float | None = None
    finished_at: float | None = None
    expires_at: float | None = None
    progress_step: int | None = None
    progress_total: int | None = None
    error_message: str | None = None
    error_code: str | None = None
    webhook: str | None = None
    webhook_status: WebhookStatus | None = None
    cancel_requested: bool = False
    images: tuple[ImageRecord, ...] = field(default=())
