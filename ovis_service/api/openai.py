"""OpenAI's Images API under `/v1`: `POST /v1/images/generations` and the model list.

The request is translated at the edge into the same `GenerationParams` the native API makes, one
job per image; errors leave in OpenAI's `{"error": {...}}` shape (see `api.errors`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any, cast

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.enums import RequestEncodingType
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Body, FromPath

from ovis_service.api.common import (
    also_answers,
    bind_request_fields,
    draw_seed,
    encode_outcome,
    levers_in_force,
    log_completed,
    quality_for,
    require_json_body,
    to_b64,
)
from ovis_service.api.errors import openai_error_body
from ovis_service.api.openai_schemas import (
    CHOICES,
    ImageData,
    ImagesResponse,
    ModelCard,
    ModelList,
    OpenAIErrorResponse,
    Usage,
    parse_size,
)
from ovis_service.api.streaming import EventStream, openai_events
from ovis_service.config import Settings
from ovis_service.errors import BadRequestError, NotFoundError
from ovis_service.generation import submit
from ovis_service.imaging import ImageFormat
from ovis_service.model_source import public_model_name
from ovis_service.request_id import current_request_id
from ovis_service.schemas import (
    DEFAULT_CFG_SCALE,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_STEPS,
    MAX_SEED,
    GenerationParams,
    split_validation_error,
)
from ovis_service.worker.pool import InferencePool

if TYPE_CHECKING:
    # Built at startup with the configured limits; see `images_request_type`.
    from ovis_service.api.openai_schemas import ImagesRequestBase as ImagesGenerateRequest

_STARTED = int(time.time())
_ERRORS = {
    code: ResponseSpec(data_container=OpenAIErrorResponse, description=text)
    for code, text in {
        400: "A field breaks a rule; `error.param` names it.",
        401: "Missing or wrong API key (only when keys are configured).",
        413: "The body is larger than the configured limit.",
        415: "The Content-Type is not application/json.",
        503: "Queue full or model loading; the SDK retries after Retry-After by itself.",
        504: "The request deadline passed.",
    }.items()
}


def _invalid(message: str, param: str | None) -> BadRequestError:
    return BadRequestError(message, param=param)


def _preview_steps(partial_images: int, steps: int) -> frozenset[int]:
    """Spread the previews evenly over the run, before the last step (which is the image)."""
    return frozenset(
        step
        for k in range(1, partial_images + 1)
        if 1 <= (step := k * steps // (partial_images + 1)) < steps
    )


def model_card(settings: Settings) -> ModelCard:
    name = public_model_name(settings.model)
    owner = name.split("/")[0] if name.count("/") == 1 else "ovis-service"
    return ModelCard(id=name, created=_STARTED, owned_by=owner or "ovis-service")


class OpenAIController(Controller):
    path = "/v1"

    @post(
        "/images/generations",
        status_code=200,
        guards=[require_json_body],
        operation_class=also_answers("text/event-stream"),
        summary="Generate images (OpenAI Images API)",
        responses=_ERRORS,
    )
    async def generate_images(
        self,
        data: Annotated[ImagesGenerateRequest, Body(media_type=RequestEncodingType.JSON)],
        request: Request[Any, Any, Any],
        worker: NamedDependency[InferencePool],
        settings: NamedDependency[Settings],
    ) -> Response[ImagesResponse] | EventStream:
        """`client.images.generate(...)` of the `openai` SDK, with `stream=True` too. Extensions:
        `negative_prompt`, `num_inference_steps`, `guidance_scale`, `seed`."""
        try:
            # Strict, like the native API: `"n": "2"` is a wrong type, not a number to guess at.
            data = msgspec.json.decode(await request.body(), type=type(data))
        except msgspec.ValidationError as exc:
            field, rule = split_validation_error(exc)
            raise _invalid(f"{field}: {rule}" if field else rule, field) from None
        for name, allowed in CHOICES.items():
            value = getattr(data, name)
            if value is not None and value not in allowed:
                raise _invalid(f"{name} must be one of {', '.join(allowed)}; got {value!r}", name)
        if not data.prompt.strip():
            raise _invalid("prompt must contain at least one non-whitespace character", "prompt")
        if data.response_format == "url":
            raise _invalid(
                'response_format "url" is not served: this service keeps no image store; '
                'use "b64_json" (the default)',
                "response_format",
            )
        if data.background == "transparent":
            raise _invalid(
                'background "transparent" is not supported: the model paints opaque images; '
                'use "auto" or "opaque"',
                "background",
            )
        try:
            width, height = parse_size(
                data.size, min(DEFAULT_IMAGE_SIZE, settings.max_image_size), settings.max_image_size
            )
        except ValueError as exc:
            raise _invalid(str(exc), "size") from None
        count = data.n if data.n is not None else 1
        first_seed = data.seed
        if first_seed is not None and first_seed + count - 1 > MAX_SEED:
            raise _invalid(f"seed + n - 1 must be at most {MAX_SEED}", "seed")
        steps = data.num_inference_steps or min(DEFAULT_STEPS, settings.max_steps)
        params = [
            GenerationParams(
                prompt=data.prompt,
                negative_prompt=data.negative_prompt or "",
                num_inference_steps=steps,
                cfg_scale=data.guidance_scale
                if data.guidance_scale is not None
                else DEFAULT_CFG_SCALE,
                width=width,
                height=height,
                seed=first_seed + index if first_seed is not None else draw_seed(),
            )
            for index in range(count)
        ]
        image_format = cast(ImageFormat, data.output_format or "png")
        quality = (
            data.output_compression
            if data.output_compression is not None
            else quality_for(image_format, settings)
        )
        echo = {
            "output_format": image_format,
            "size": f"{width}x{height}",
            "quality": data.quality or "auto",
            "background": "opaque",
        }
        request_id = current_request_id()
        fields = bind_request_fields(
            params[0], settings, request_id, n=count, model_asked=data.model, user=data.user
        )
        partial_images = data.partial_images or 0
        generation = submit(
            worker,
            params,
            request_id=request_id,
            timeout=settings.request_timeout,
            watch=bool(data.stream),
            preview_steps=_preview_steps(partial_images, steps) if data.stream else frozenset(),
        )
        headers = {"X-Seed": str(params[0].seed)}
        if data.stream:
            return EventStream(
                openai_events(
                    generation,
                    params,
                    settings,
                    worker,
                    fields=fields,
                    image_format=image_format,
                    quality=quality,
                    echo=echo,
                    error_body=openai_error_body,
                ),
                headers=headers,
            )
        outcomes = await generation.outcomes(request)
        levers = levers_in_force(worker)
        items = []
        for index, (outcome, job_params) in enumerate(zip(outcomes, params, strict=True)):
            image, encode_seconds = await encode_outcome(
                outcome, job_params, settings, image_format, quality=quality, levers=levers
            )
            log_completed(outcome, encode_seconds, fields, image_index=index)
            items.append(
                ImageData(b64_json=to_b64(image), revised_prompt=None, seed=job_params.seed)
            )
        body = ImagesResponse(created=int(time.time()), data=items, usage=Usage(), **echo)
        return Response(body, headers=headers)

    @get("/models", summary="The loaded model, as OpenAI's model list")
    async def list_models(self, settings: NamedDependency[Settings]) -> ModelList:
        return ModelList(data=[model_card(settings)])

    @get(
        "/models/{model_id:path}",
        summary="One model card",
        responses={
            404: ResponseSpec(
                data_container=OpenAIErrorResponse, description="No model by that id is served."
            )
        },
    )
    async def get_model(
        self, model_id: FromPath[str], settings: NamedDependency[Settings]
    ) -> ModelCard:
        card = model_card(settings)
        if model_id.lstrip("/") != card.id:
            raise NotFoundError(
                f"no model {model_id.lstrip('/')!r}; this service serves {card.id!r}", param="model"
            )
        return card
