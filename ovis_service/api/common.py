"""Pieces every API surface uses: the JSON guard, seeds, request log fields."""

import base64
import secrets
from dataclasses import dataclass
from typing import Any

import structlog
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi.spec import (
    OpenAPIFormat,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    Schema,
)

from ovis_service.config import Settings
from ovis_service.errors import UnsupportedMediaTypeError
from ovis_service.schemas import MAX_SEED, GenerationParams

logger = structlog.get_logger(__name__)


def require_json_body(
    connection: ASGIConnection[Any, Any, Any, Any], _handler: BaseRouteHandler
) -> None:
    """Refuse a body that does not say it is JSON, before it is read. Besides a clear message
    for `curl -d` without a header, this keeps browsers from sending "simple" cross-site
    requests (text/plain, forms) that would make the GPU work for another site's page."""
    media_type = connection.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise UnsupportedMediaTypeError(
            "Content-Type must be application/json, got "
            + (repr(media_type) if media_type else "none")
        )


def draw_seed() -> int:
    return secrets.randbelow(MAX_SEED + 1)


def bind_request_fields(
    params: GenerationParams, settings: Settings, request_id: str, **extra: object
) -> dict[str, object]:
    """The fields of the request's log line, bound for the error handler's line too."""
    fields: dict[str, object] = {
        "request_id": request_id,
        "seed": params.seed,
        "width": params.width,
        "height": params.height,
        "steps": params.num_inference_steps,
        "cfg_scale": params.cfg_scale,
        "prompt_chars": len(params.prompt),
        **extra,
    }
    if settings.log_prompts:
        fields.update(prompt=params.prompt, negative_prompt=params.negative_prompt)
    structlog.contextvars.bind_contextvars(**fields)
    return fields


_TEXT = Schema(type=OpenAPIType.STRING)
# One server-sent event, as event-stream readers parse it; `data` holds the JSON payload.
_EVENT = Schema(
    type=OpenAPIType.OBJECT,
    properties={
        "event": _TEXT,
        "data": _TEXT,
        "id": _TEXT,
        "retry": Schema(type=OpenAPIType.INTEGER),
    },
)


def _schema_of(media_type: str) -> Schema:
    if media_type == "text/event-stream":
        return _EVENT
    return Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY)


def also_answers(*media_types: str) -> type[Operation]:
    """An OpenAPI operation whose 200 also documents `media_types` besides the handler's own
    (Litestar documents one media type per status; these handlers choose by Accept or by the
    `stream` field)."""

    @dataclass
    class MultiMediaOperation(Operation):
        def __post_init__(self) -> None:
            ok = (self.responses or {}).get("200")
            if isinstance(ok, OpenAPIResponse):
                content = dict(ok.content or {})
                for media_type in media_types:
                    content[media_type] = OpenAPIMediaType(schema=_schema_of(media_type))
                ok.content = content

    return MultiMediaOperation


async def utf8_scripts(response: Any) -> Any:
    """An `after_request` hook for static files. Python 3.10 and some `/etc/mime.types` call
    `.js` `application/javascript` with no charset; browsers then guess the encoding, and a
    non-ASCII character breaks the script."""
    content_type = response.headers.get("content-type", "")
    if "javascript" in content_type and "charset" not in content_type:
        response.headers["content-type"] = "text/javascript; charset=utf-8"
    return response


def to_b64(data: bytes) -> str:
    """An image file as the `b64_json` both APIs answer with."""
    return base64.b64encode(data).decode()
