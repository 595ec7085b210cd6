"""One exception hierarchy. Each error carries its own answer: the HTTP status, the `code` of
OpenAI's error object, and the reason `ovis_rejected_total` counts it under (if any), so the
exception handler, the streams and the worker read them instead of telling errors apart."""

from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar, Literal

RejectReason = Literal["queue_full", "loading", "shutting_down", "out_of_memory", "deadline"]
"""Why the service turned a job away, as `ovis_rejected_total{reason}` counts it."""

_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


class ServiceError(Exception):
    """Base of every error the service answers on purpose; `detail` is safe to show a client."""

    status_code: ClassVar[int] = 500
    openai_code: ClassVar[str | None] = None
    reject_reason: ClassVar[RejectReason | None] = None  # None: not counted as a rejection
    headers: ClassVar[Mapping[str, str]] = _NO_HEADERS  # sent with every answer of this kind

    def __init__(
        self, detail: str, *, retry_after: int | None = None, param: str | None = None
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after
        self.param = param  # the request field at fault, when there is one


class BadRequestError(ServiceError):
    status_code = 422


class MalformedHeaderError(ServiceError):
    """A header the service reads (Accept) cannot be parsed."""

    status_code = 400


class UnsupportedMediaTypeError(ServiceError):
    status_code = 415
    openai_code = "unsupported_media_type"


class NotAcceptableError(ServiceError):
    """The client's Accept header allows none of the formats the service makes."""

    status_code = 406


class NotFoundError(ServiceError):
    status_code = 404
    openai_code = "not_found"


class UnauthorizedError(ServiceError):
    status_code = 401
    openai_code = "invalid_api_key"
    headers = MappingProxyType({"WWW-Authenticate": "Bearer"})


class OverloadedError(ServiceError):
    """The queue has no room for the request's images."""

    status_code = 503
    openai_code = "queue_full"
    reject_reason: ClassVar[RejectReason | None] = "queue_full"


class OutOfMemoryError(OverloadedError):
    """The GPU ran out of memory for this request; a smaller image or a later retry may fit."""

    openai_code = "out_of_memory"
    reject_reason = "out_of_memory"


class NotReadyError(ServiceError):
    """No model to run the job: as such, it failed to load or an inference thread is gone, and
    only a restart helps; as `ModelLoadingError`, it is still loading."""

    status_code = 503
    openai_code = "model_not_ready"


class ModelLoadingError(NotReadyError):
    """The model is still loading: retrying shortly helps."""

    reject_reason = "loading"


class ShuttingDownError(ServiceError):
    status_code = 503
    openai_code = "shutting_down"
    reject_reason = "shutting_down"


class StoreUnavailableError(ServiceError):
    """The job store cannot be written (a full disk, a database that is down)."""

    status_code = 503
    openai_code = "store_unavailable"


class DeadlineExceededError(ServiceError):
    status_code = 504
    openai_code = "timeout"
    reject_reason = "deadline"


class JobCancelledError(ServiceError):
    """The client went away; nobody reads this answer, but the status keeps the logs honest."""

    status_code = 499


class GenerationFailedError(ServiceError):
    """Something unexpected broke; the client gets this generic text, the log gets the traceback."""

    status_code = 500

    def __init__(self) -> None:
        super().__init__("internal error while generating the image")
