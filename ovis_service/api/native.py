"""The native API: `POST /generate`, JSON in, an image (or a progress stream) out."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from litestar import Controller, Request, Response, post
from litestar.di import NamedDependency
from litestar.enums import RequestEncodingType
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Body

from ovis_service.api.common import (
    also_answers,
    bind_request_fields,
    draw_seed,
    require_json_body,
)
from ovis_service.api.job_schemas import Job
from ovis_service.api.respond_async import accept_job, refuse_webhook_without_job, wants_async
from ovis_service.api.streaming import EventStream, native_events
from ovis_service.config import Settings
from ovis_service.errors import BadRequestError, MalformedHeaderError, NotAcceptableError
from ovis_service.generation import encoding_for, submit
from ovis_service.imaging import FORMATS, MEDIA_TYPES, ImageFormat
from ovis_service.job_runner import JobRunner
from ovis_service.request_id import current_request_id
from ovis_service.schemas import (
    ErrorResponse,
    GenerationParams,
    decode_generate_request,
    describe_validation_error,
)
from ovis_service.store.job_store import JobStore
from ovis_service.worker.pool import InferencePool

if TYPE_CHECKING:
    # The real type is built at startup with the configured limits (see `generate_request_type`)
    # and handed to Litestar through the app's `signature_namespace`.
    from ovis_service.schemas import GenerateRequestBase as GenerateRequest

EVENT_STREAM = "text/event-stream"
# The order is the preference when the client accepts several (`*/*` means PNG).
_OFFERED = [MEDIA_TYPES[image_format] for image_format in FORMATS] + [EVENT_STREAM]
_FORMAT_OF_MEDIA_TYPE = {media_type: fmt for fmt, media_type in MEDIA_TYPES.items()}

_ERROR_RESPONSES = {
    code: ResponseSpec(data_container=ErrorResponse, description=text)
    for code, text in {
        400: "The body is not JSON.",
        401: "Missing or wrong API key (only when keys are configured).",
        406: "The Accept header allows none of image/png, image/webp, image/jpeg or "
        "text/event-stream.",
        413: "The body is larger than the configured limit.",
        415: "The Content-Type is not application/json.",
        422: "A field breaks a rule; `detail` names the field and the rule.",
        503: "Queue full, model loading, GPU out of memory or shutting down; see Retry-After.",
        504: "The request deadline passed.",
    }.items()
} | {
    202: ResponseSpec(
        data_container=Job,
        description="With `Prefer: respond-async`: the job, committed; follow it at `Location`.",
    )
}


def negotiate(request: Request[Any, Any, Any]) -> ImageFormat | None:
    """The image format the client asked for, or None for the event stream."""
    try:
        media_type = request.accept.best_match(_OFFERED, default=None)
    except (ValueError, OverflowError):  # e.g. `q=1e999`, which Litestar turns into infinity
        raise MalformedHeaderError(
            "the Accept header could not be parsed; send e.g. `Accept: image/png`"
        ) from None
    if media_type is None:
        raise NotAcceptableError(
            "Accept must allow one of: " + ", ".join(_OFFERED) + " (no Accept header means PNG)"
        )
    return _FORMAT_OF_MEDIA_TYPE.get(media_type)


class NativeController(Controller):
    path = "/generate"
    guards = (require_json_body,)

    @post(
        "/",
        status_code=200,
        media_type="image/png",
        operation_class=also_answers("image/webp", "image/jpeg", EVENT_STREAM),
        summary="Generate an image",
        responses=_ERROR_RESPONSES,
        response_description="The image (PNG unless Accept asks for WebP or JPEG), with the "
        "generation parameters in its metadata; or, with `Accept: text/event-stream`, `progress` "
        "events then one `image` event.",
    )
    async def generate(
        self,
        # Unknown fields are refused (forbid_unknown_fields); the schema says so too.
        data: Annotated[
            GenerateRequest,
            Body(
                media_type=RequestEncodingType.JSON,
                schema_extra={"additionalProperties": False},
            ),
        ],
        *,
        request: Request[Any, Any, Any],
        worker: NamedDependency[InferencePool],
        settings: NamedDependency[Settings],
        store: NamedDependency[JobStore],
        runner: NamedDependency[JobRunner],
    ) -> Response[bytes] | EventStream | Response[Job]:
        """Generate one image. The seed used comes back in `X-Seed`. With `Prefer:
        respond-async` the answer is a job (202), its image in the Accept header's format."""
        # Litestar has already parsed `data`, but leniently ("5" passes as 5); the API promises
        # that a wrong type is refused, so the cached raw body is decoded again, strictly.
        try:
            data = decode_generate_request(await request.body(), type(data))
        except msgspec.ValidationError as exc:
            raise BadRequestError(describe_validation_error(exc)) from None
        params = generation_params(data)
        if wants_async(request):
            return await accept_job(
                request,
                api="native",
                params=[params],
                image_format=_job_format(request),
                quality=None,
                webhook=data.webhook,
                store=store,
                runner=runner,
                worker=worker,
                settings=settings,
            )
        refuse_webhook_without_job(data.webhook)
        image_format = negotiate(request)
        request_id = current_request_id()
        fields = bind_request_fields(params, settings, request_id)
        generation = submit(
            worker,
            [params],
            request_id=request_id,
            timeout=settings.request_timeout,
            watch=image_format is None,
        )
        encoding = encoding_for(worker, settings, image_format or "png")
        seed_header = {"X-Seed": str(params.seed)}
        if image_format is None:
            return EventStream(native_events(generation, encoding, fields), headers=seed_header)
        (image,) = await generation.encoded(request, encoding, fields)
        outcome = image.outcome
        return Response(
            image.data,
            media_type=MEDIA_TYPES[image_format],
            headers={
                **seed_header,
                "X-Prompt-Truncated": "true" if outcome.result.prompt_truncated else "false",
                "Server-Timing": (
                    f"queue;dur={outcome.queue_seconds * 1000:.1f}, "
                    f"generate;dur={outcome.generation_seconds * 1000:.1f}, "
                    f"encode;dur={image.encode_seconds * 1000:.1f}"
                ),
                "Vary": "Accept",
            },
        )


def _job_format(request: Request[Any, Any, Any]) -> ImageFormat:
    """A job answers in JSON; an image type in Accept chooses its images' format (PNG if none)."""
    try:
        media_type = request.accept.best_match(_OFFERED[: len(FORMATS)], default=None)
    except (ValueError, OverflowError):
        media_type = None
    return _FORMAT_OF_MEDIA_TYPE.get(media_type or "", "png")


def generation_params(data: GenerateRequest) -> GenerationParams:
    """The job a valid `/generate` body asks for, with its seed drawn if it named none."""
    width, height = data.size
    return GenerationParams(
        prompt=data.prompt,
        negative_prompt=data.negative_prompt,
        num_inference_steps=data.num_inference_steps,
        cfg_scale=data.cfg_scale,
        width=width,
        height=height,
        seed=data.seed if data.seed is not None else draw_seed(),
    )
