"""Server-sent events for both APIs. Litestar's `ServerSentEvent` does the framing; this module
only decides what each event says.

Native (`POST /generate` with `Accept: text/event-stream`): `progress` {step, total} after each
denoising step, then `image` {b64_json, seed, format}, or `error` {detail, request_id}.

OpenAI (`"stream": true`): `image_generation.partial_image` for each preview, then one
`image_generation.completed` per image; a failure once the stream has begun is a plain
`data: {"error": {...}}` event, which the `openai` SDK raises.
"""

import json
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import msgspec
import structlog
from litestar.response import ServerSentEvent, ServerSentEventMessage

from ovis_service.api.common import to_b64
from ovis_service.api.errors import openai_error_body
from ovis_service.api.openai_schemas import Usage
from ovis_service.errors import GenerationFailedError, ServiceError
from ovis_service.generation import (
    EncodedImage,
    Encoding,
    Generation,
    ImageDone,
    PreviewReady,
    StepDone,
    finish_image,
)
from ovis_service.request_id import current_request_id

logger = structlog.get_logger(__name__)


class EventStream(ServerSentEvent):
    """Litestar lets a handler's declared media type override a stream's own; `/generate`
    declares `image/png` for its usual answer, so the event stream insists on its own type."""

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["media_type"] = self.media_type
        return super().to_asgi_response(*args, **kwargs)


def _json(payload: Mapping[str, Any]) -> str:
    return json.dumps(payload, separators=(",", ":"))


def _as_service_error(exc: Exception) -> ServiceError:
    """Errors after the stream has begun travel as events; unexpected ones stay generic."""
    if isinstance(exc, ServiceError):
        return exc
    logger.exception("stream_failed")
    return GenerationFailedError()


def _log_failure(error: ServiceError) -> None:
    logger.info("request_failed_mid_stream", status=error.status_code, detail=error.detail)


async def native_events(
    generation: Generation, encoding: Encoding, log_fields: dict[str, object]
) -> AsyncIterator[ServerSentEventMessage]:
    try:
        async for event in generation.stream():
            if isinstance(event, StepDone):
                progress = {"step": event.steps_done, "total": event.total}
                yield ServerSentEventMessage(event="progress", data=_json(progress))
            elif isinstance(event, ImageDone):
                image = await _finish(generation, event, encoding, log_fields)
                result = {
                    "b64_json": to_b64(image.data),
                    "seed": image.params.seed,
                    "format": encoding.image_format,
                }
                yield ServerSentEventMessage(event="image", data=_json(result))
    except Exception as exc:
        error = _as_service_error(exc)
        _log_failure(error)
        failure = {"detail": error.detail, "request_id": current_request_id()}
        yield ServerSentEventMessage(event="error", data=_json(failure))


async def openai_events(
    generation: Generation,
    encoding: Encoding,
    log_fields: dict[str, object],
    echo: Mapping[str, str],
) -> AsyncIterator[ServerSentEventMessage]:
    """`echo` holds the response fields every event repeats (size, quality, background,
    output_format)."""
    partial_index = [0] * len(generation.jobs)
    try:
        async for event in generation.stream():
            if isinstance(event, PreviewReady):
                preview = await encoding.encode(event.image, generation.params[event.index])
                yield _openai_event(
                    "image_generation.partial_image",
                    {
                        "b64_json": to_b64(preview),
                        "partial_image_index": partial_index[event.index],
                        "created_at": int(time.time()),
                        **echo,
                    },
                )
                partial_index[event.index] += 1
            elif isinstance(event, ImageDone):
                image = await _finish(generation, event, encoding, log_fields)
                yield _openai_event(
                    "image_generation.completed",
                    {
                        "b64_json": to_b64(image.data),
                        "created_at": int(time.time()),
                        **echo,
                        "usage": ZERO_USAGE,
                        "seed": image.params.seed,
                    },
                )
    except Exception as exc:
        error = _as_service_error(exc)
        _log_failure(error)
        yield ServerSentEventMessage(data=_json(openai_error_body(error)))


async def _finish(
    generation: Generation, event: ImageDone, encoding: Encoding, log_fields: dict[str, object]
) -> EncodedImage:
    params = generation.params[event.index]
    return await finish_image(event.index, event.outcome, params, encoding, log_fields, stream=True)


# The service counts no tokens; OpenAI's clients expect the object to be there.
ZERO_USAGE: dict[str, Any] = msgspec.to_builtins(Usage())


def _openai_event(event_type: str, payload: Mapping[str, Any]) -> ServerSentEventMessage:
    return ServerSentEventMessage(event=event_type, data=_json({"type": event_type, **payload}))
