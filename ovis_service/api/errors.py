"""The one place that turns exceptions into JSON error responses.

Native routes answer `{"detail", "request_id"}`; everything under `/v1` answers OpenAI's
`{"error": {"message", "type", "param", "code"}}`, so the `openai` SDK raises its own typed
errors. Under `/v1` a broken rule is a 400, never a 422: the SDK would not retry either, but
OpenAI's own clients expect 400.
"""

from typing import Any

import structlog
from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException

from ovis_service.errors import ServiceError
from ovis_service.request_id import (
    NO_REQUEST_ID,
    REQUEST_ID_HEADER,
    current_request_id,
    request_id_from_headers,
)
from ovis_service.schemas import ErrorResponse, hint_unknown_field

logger = structlog.get_logger(__name__)

# msgspec's wording for a body that is not JSON at all.
_MALFORMED = ("JSON is malformed", "Input data was truncated")


OPENAI_PREFIX = "/v1"
_CLIENT_LEFT_MID_BODY = "client disconnected prematurely"  # Litestar's own words


def handle_exception(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    headers: dict[str, str] = {}
    param: str | None = None
    if isinstance(exc, ServiceError):
        status, detail, param = exc.status_code, exc.detail, exc.param
        headers.update(exc.headers)
        if exc.retry_after is not None:
            headers["Retry-After"] = str(exc.retry_after)
    elif isinstance(exc, ValidationException):
        status, detail, param = _describe_validation(exc)
    elif isinstance(exc, HTTPException) and exc.detail == _CLIENT_LEFT_MID_BODY:
        # Litestar reports a client that hung up while sending its body as a 500; nobody reads
        # this answer, and the log should not count it as a server fault.
        status, detail = 499, "the client disconnected while sending the request body"
    elif isinstance(exc, HTTPException):
        status, detail = exc.status_code, exc.detail
        headers.update(exc.headers or {})
        if status == 413:
            detail = _too_large(request)
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
    path = request.url.path
    if path == OPENAI_PREFIX or path.startswith(OPENAI_PREFIX + "/"):
        status = 400 if status == 422 else status
        return Response(
            _openai_body(status, detail, param, exc),
            status_code=status,
            headers=headers,
            media_type=MediaType.JSON,
        )
    return Response(
        ErrorResponse(detail=detail, request_id=request_id),
        status_code=status,
        headers=headers,
        media_type=MediaType.JSON,
    )


def openai_error_body(error: ServiceError) -> dict[str, Any]:
    """OpenAI's error object for an error raised once a stream has begun."""
    return _openai_body(error.status_code, error.detail, error.param, error)


def _openai_body(status: int, detail: str, param: str | None, exc: Exception) -> dict[str, Any]:
    if status >= 500:
        error_type = "server_error"
    elif status == 401:
        error_type = "authentication_error"
    else:
        error_type = "invalid_request_error"
    return {
        "error": {
            "message": detail,
            "type": error_type,
            "param": param,
            "code": _openai_code(status, exc),
        }
    }


# Errors raised by Litestar itself, which carry only a status.
_OPENAI_CODES_BY_STATUS = {
    404: "not_found",
    413: "request_too_large",
    415: "unsupported_media_type",
}


def _openai_code(status: int, exc: Exception) -> str | None:
    if isinstance(exc, ServiceError):
        return exc.openai_code
    return _OPENAI_CODES_BY_STATUS.get(status)


def _too_large(request: Request[Any, Any, Any]) -> str:
    """Name the limit, so the client knows how far to shrink the body."""
    limit = request.route_handler.resolve_request_max_body_size()
    return f"the request body is larger than the limit of {limit} bytes (OVIS_MAX_BODY_BYTES)"


def _describe_validation(exc: ValidationException) -> tuple[int, str, str | None]:
    """Name the field and the rule, e.g. `image_size: Expected int that's a multiple of 16`."""
    problems = [
        p for p in (exc.extra if isinstance(exc.extra, list) else []) if isinstance(p, dict)
    ]
    if not problems:
        return 400, str(exc.detail), None
    parts = []
    first_key: str | None = None
    for problem in problems:
        message = str(problem.get("message", "")).replace("`", "")
        key = problem.get("key")
        if key == "data" and message == "'data'":
            # Litestar's way of saying there was no body at all.
            return (
                400,
                "the request body is empty: send a JSON object with at least `prompt`",
                None,
            )
        if key == "data":
            key = None  # the error concerns the body as a whole, or names its field itself
        parts.append(f"{key}: {message}" if key else hint_unknown_field(message))
        if first_key is None and isinstance(key, str):
            first_key = key
    detail = "; ".join(parts)
    # A body that isn't JSON is a 400; well-formed JSON that breaks a rule is a 422.
    return (400 if detail.startswith(_MALFORMED) else 422), detail, first_key
