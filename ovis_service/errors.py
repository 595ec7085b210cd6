"""One exception hierarchy: each error knows its HTTP status and what the client may read."""

from typing import ClassVar


class ServiceError(Exception):
    """Base of every error the service answers on purpose; `detail` is safe to show a client."""

    status_code: ClassVar[int] = 500

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


class NotAcceptableError(ServiceError):
    """The client's Accept header allows none of the formats the service makes."""

    status_code = 406


class NotFoundError(ServiceError):
    status_code = 404


class UnauthorizedError(ServiceError):
    status_code = 401


class OverloadedError(ServiceError):
    """The queue is full, or the GPU ran out of memory for this request."""

    status_code = 503


class NotReadyError(ServiceError):
    """The model is still loading, failed to load, or the inference thread is gone."""

    status_code = 503


class ShuttingDownError(ServiceError):
    status_code = 503


class DeadlineExceededError(ServiceError):
    status_code = 504


class JobCancelledError(ServiceError):
    """The client went away; nobody reads this answer, but the status keeps the logs honest."""

    status_code = 499


class GenerationFailedError(ServiceError):
    """Something unexpected broke; the client gets this generic text, the log gets the traceback."""

    status_code = 500

    def __init__(self) -> None:
        super().__init__("internal error while generating the image")
