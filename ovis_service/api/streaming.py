"""Server-sent events for both APIs. Litestar's `ServerSentEvent` does the framing; this module
only decides what each event says.

Native (`POST /generate` with `Accept: text/event-stream`): `progress` {step, total} after each
denoising step, then `image` {b64_json, seed, format}, or `error` {detail, request_id}.

OpenAI (`"stream": true`): `image_generation.partial_image` for each preview, then one
`image_generation.completed` per image; a failure once the stream has begun is a plain
`data: {"error": {...}}` event, which the `openai` SDK raises.
"""

import asyncio
import json
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import structlog
from litestar.response import ServerSentEvent, ServerSentEventMessage

from ovis_service.api.common import encode_outcome, levers_in_force, log_completed, to_b64
from ovis_service.config import Settings
from ovis_service.errors import GenerationFailedError, ServiceError
from ovis_service.generation import Generation, ImageDone, PreviewReady, StepDone
from ovis_service.imaging import ImageFormat, encode_image
from ovis_service.model_source import public_model_name
from ovis_service.request_id import current_request_id
from ovis_service.schemas import GenerationParams
from ovis_service.worker.pool import InferencePool

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
    generation: Generation,
    params: GenerationParams,
    settings: Settings,
    worker: InferencePool,
    fields: dict[str, object],
) -> AsyncIterator[ServerSentEventMessage]:
    try:
        async for event in generation.stream():
            if isinstance(event, StepDone):
                progress = {"step": event.steps_done, "total": event.total}
                yield ServerSentEventMessage(event="progress", data=_json(progress))
            elif isinstance(event, ImageDone):
                image, encode_seconds = await encode_outcome(
                    event.outcome, params, settings, "png", levers=levers_in_force(worker)
                )
                log_completed(event.outcome, encode_seconds, fields, stream=True)
                result = {
                    "b64_json": to_b64(image),
                    "seed": params.seed,
                    "format": "png",
                }
                yield ServerSentEventMessage(event="image", data=_json(result))
    except Exception as exc:
        error = _as_service_error(exc)
        _log_failure(error)
        failure = {"detail": error.detail, "request_id": current_request_id()}
        yield ServerSentEventMessage(event="error", data=_json(failure))


async def openai_events(
    generation: Generation,
    params: list[GenerationParams],
    settings: Settings,
    worker: InferencePool,
    *,
    fields: dict[str, object],
    image_format: ImageFormat,
    quality: int,
    echo: Mapping[str, str],
    error_body: Any,
) -> AsyncIterator[ServerSentEventMessage]:
    """`echo` holds the response fields every event repeats (size, quality, background,
    output_format); `error_body(error)` renders OpenAI's error object."""
    partial_index = [0] * len(params)
    levers = levers_in_force(worker)
    try:
        async for event in generation.stream():
            if isinstance(event, PreviewReady):
                # Off the event loop: a large PNG takes a good part of a second to encode.
                preview = await asyncio.to_thread(
                    encode_image,
                    event.image,
                    params[event.index],
                    public_model_name(settings.model),
                    image_format=image_format,
                    quality=quality,
                    levers=levers,
                )
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
                job_params = params[event.index]
                image, encode_seconds = await encode_outcome(
                    event.outcome,
                    job_params,
                    settings,
                    image_format,
                    quality=quality,
                    levers=levers,
                )
                log_completed(event.outcome, encode_seconds, fields, image_index=event.index)
                yield _openai_event(
                    "image_generation.completed",
                    {
                        "b64_json": to_b64(image),
                        "created_at": int(time.time()),
                        **echo,
                        "usage": ZERO_USAGE,
                        "seed": job_params.seed,
                    },
                )
    except Exception as exc:
        error = _as_service_error(exc)
        _log_failure(error)
        yield ServerSentEventMessage(data=_json(error_body(error)))


# The service counts no tokens; OpenAI's clients expect the object to be there.
ZERO_USAGE: dict[str, Any] = {
    "input_tokens": 0,
    "output_tokens": 0,
    "total_tokens": 0,
    "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
}


def _openai_event(event_type: str, payload: Mapping[str, Any]) -> ServerSentEventMessage:
    return ServerSentEventMessage(event=event_type, data=_json({"type": event_type, **payload}))
