"""OpenAI's Images API under `/v1`: `POST /v1/images/generations` and the model list.

The request is translated at the edge into the same `GenerationParams` the native API makes, one
job per image; errors leave in OpenAI's `{"error": {...}}` shape (see `api.errors`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.enums import RequestEncodingType
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Body, FromPath

from ovis_service.api.common import (
    also_answers,
    bind_request_fields,
    require_json_body,
    to_b64,
)
from ovis_service.api.job_schemas import Job, image_url
from ovis_service.api.openai_schemas import (
    ImageData,
    ImagesResponse,
    ModelCard,
    ModelList,
    OpenAIErrorResponse,
    Usage,
)
from ovis_service.api.openai_translation import translate
from ovis_service.api.respond_async import (
    accept_job,
    public_base,
    refuse_webhook_without_job,
    store_images,
    wants_async,
)
from ovis_service.api.streaming import EventStream, openai_events
from ovis_service.config import Settings
from ovis_service.errors import BadRequestError, NotFoundError
from ovis_service.generation import encoding_for, submit
from ovis_service.job_runner import JobRunner
from ovis_service.model_source import public_model_name
from ovis_service.request_id import current_request_id
from ovis_service.schemas import split_validation_error
from ovis_service.store.job_store import JobStore
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
} | {
    202: ResponseSpec(
        data_container=Job,
        description="With `Prefer: respond-async`: the job, committed; follow it at `Location`.",
    )
}


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
        *,
        request: Request[Any, Any, Any],
        worker: NamedDependency[InferencePool],
        settings: NamedDependency[Settings],
        store: NamedDependency[JobStore],
        runner: NamedDependency[JobRunner],
    ) -> Response[ImagesResponse] | EventStream | Response[Job]:
        """`client.images.generate(...)` of the `openai` SDK, with `stream=True` too. Extensions:
        `negative_prompt`, `num_inference_steps`, `guidance_scale`, `seed`, and `webhook` for a
        job (`Prefer: respond-async`, answered 202)."""
        try:
            # Strict, like the native API: `"n": "2"` is a wrong type, not a number to guess at.
            data = msgspec.json.decode(await request.body(), type=type(data))
        except msgspec.ValidationError as exc:
            field, rule = split_validation_error(exc)
            raise BadRequestError(f"{field}: {rule}" if field else rule, param=field) from None
        plan = translate(data, settings)
        if wants_async(request):
            if plan.stream:
                raise BadRequestError(
                    "stream: a job answers at once with 202 and streams at "
                    "GET /jobs/{id}/events; leave out either `stream` or `Prefer: respond-async`",
                    param="stream",
                )
            return await accept_job(
                request,
                api="openai",
                params=plan.params,
                image_format=plan.image_format,
                quality=plan.encode_quality,
                webhook=data.webhook,
                store=store,
                runner=runner,
                worker=worker,
                settings=settings,
            )
        refuse_webhook_without_job(data.webhook)
        request_id = current_request_id()
        fields = bind_request_fields(
            plan.params[0],
            settings,
            request_id,
            n=len(plan.params),
            model_asked=data.model,
            user=data.user,
        )
        generation = submit(
            worker,
            plan.params,
            request_id=request_id,
            timeout=settings.request_timeout,
            watch=plan.stream,
            preview_steps=plan.preview_steps,
        )
        encoding = encoding_for(worker, settings, plan.image_format, plan.encode_quality)
        headers = {"X-Seed": str(plan.params[0].seed)}
        if plan.stream:
            return EventStream(
                openai_events(generation, encoding, fields, plan.echo), headers=headers
            )
        images = await generation.encoded(request, encoding, fields)
        if plan.urls:
            record = await store_images(
                request, images, plan.image_format, store=store, settings=settings
            )
            base = public_base(request, settings)
            items = [
                ImageData(
                    url=image_url(base, stored),
                    revised_prompt=None,
                    seed=stored.seed,
                )
                for stored in record.images
            ]
        else:
            items = [
                ImageData(b64_json=to_b64(image.data), revised_prompt=None, seed=image.params.seed)
                for image in images
            ]
        body = ImagesResponse(created=int(time.time()), data=items, usage=Usage(), **plan.echo)
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
