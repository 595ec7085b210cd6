"""The one place that turns exceptions into JSON error responses."""

from typing import Any

import structlog
from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException

from ovis_service.errors import ServiceError, UnauthorizedError
from ovis_service.request_id import (
    NO_REQUEST_ID,
    REQUEST_ID_HEADER,
    current_request_id,
    request_id_from_headers,
)
from ovis_service.schemas import ErrorResponse

logger = structlog.get_logger(__name__)

# msgspec's wording for a body that is not JSON at all.
_MALFORMED = ("JSON is malformed", "Input data was truncated")


def handle_exception(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorResponse]:
    headers: dict[str, str] = {}
    if isinstance(exc, ServiceError):
        status, detail = exc.status_code, exc.detail
        if exc.retry_after is not None:
            headers["Retry-After"] = str(exc.retry_after)
        if isinstance(exc, UnauthorizedError):
            headers["WWW-Authenticate"] = "Bearer"
    elif isinstance(exc, ValidationException):
        status, detail = _describe_validation(exc)
    elif isinstance(exc, HTTPException):
        status, detail = exc.status_code, exc.detail
        headers.update(exc.headers or {})
    elif isinstance(exc, RecursionError):
        # Litestar first parses the body without a type, one recursion per nesting level, so a
        # small body of `[[[[...` ends here: the client's mistake, not a server error.
        status, detail = 400, "the JSON is nested too deeply"
    elif isinstance(exc, UnicodeDecodeError):
        # msgspec raises this, not a DecodeError, for a string that is not UTF-8, and Litestar
        # lets it through.
        status, detail = 400, "the body is not valid UTF-8"
    else:
        # The traceback goes to the log only; the client gets the id to quote in a bug report.
        logger.exception("unhandled_error", path=request.url.path)
        status, detail = 500, "internal server error"
    logger.info("request_rejected", path=request.url.path, status=status, detail=detail)
    request_id = current_request_id()
    if request_id == NO_REQUEST_ID:
        # Unrouted requests (404, 405) never pass through the route middleware.
        request_id = request_id_from_headers(request.headers.get(REQUEST_ID_HEADER))
        headers[REQUEST_ID_HEADER] = request_id
    return Response(
        ErrorResponse(detail=detail, request_id=request_id),
        status_code=status,
        headers=headers,
        media_type=MediaType.JSON,
    )


def _describe_validation(exc: ValidationException) -> tuple[int, str]:
    """Name the field and the rule, e.g. `image_size: Expected int that's a multiple of 16`."""
    problems = [
        p for p in (exc.extra if isinstance(exc.extra, list) else []) if isinstance(p, dict)
    ]
    if not problems:
        return 400, str(exc.detail)
    parts = []
    for problem in problems:
        message = str(problem.get("message", "")).replace("`", "")
        key = problem.get("key")
        if key == "data" and message == "'data'":
            # Litestar's way of saying there was no body at all.
            return 400, "the request body is empty: send a JSON object with at least `prompt`"
        if key == "data":
            key = None  # the error concerns the body as a whole, or names its field itself
        parts.append(f"{key}: {message}" if key else message)
    detail = "; ".join(parts)
    # A body that isn't JSON is a 400; well-formed JSON that breaks a rule is a 422.
    return (400 if detail.startswith(_MALFORMED) else 422), detail
