"""HTTP handlers: validate, queue, wait, encode. The pipeline itself is never touched here."""

import asyncio
import secrets
import time
from typing import Annotated, Any

import msgspec
import structlog
from litestar import Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.enums import RequestEncodingType
from litestar.handlers import HTTPRouteHandler
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Body

from ovis_service.auth import PUBLIC
from ovis_service.config import Settings
from ovis_service.errors import (
    BadRequestError,
    DeadlineExceededError,
    JobCancelledError,
    UnsupportedMediaTypeError,
)
from ovis_service.png import encode_png
from ovis_service.request_id import current_request_id
from ovis_service.schemas import (
    MAX_SEED,
    ErrorResponse,
    GenerateRequestBase,
    GenerationParams,
    HealthResponse,
    decode_generate_request,
    describe_validation_error,
    generate_request_type,
)
from ovis_service.worker import InferenceWorker, Job, JobOutcome, WorkerState

logger = structlog.get_logger(__name__)

# The worker enforces the deadline between denoising steps; this grace lets it answer first.
_DEADLINE_GRACE_SECONDS = 5.0


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


async def _wait_for_disconnect(request: Request[Any, Any, Any]) -> None:
    """Returns when the client hangs up. The body has been read, so the next ASGI message the
    server sends is `http.disconnect`."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _await_outcome(job: Job, request: Request[Any, Any, Any], timeout: float) -> JobOutcome:
    disconnect: asyncio.Future[None] = asyncio.ensure_future(_wait_for_disconnect(request))
    waiters: set[asyncio.Future[Any]] = {job.future, disconnect}
    try:
        done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if job.future in done:
            return job.future.result()
        job.cancel()
        job.future.cancel()
        if disconnect in done:
            raise JobCancelledError("the client disconnected")
        raise DeadlineExceededError("the request deadline passed")
    except asyncio.CancelledError:
        job.cancel()
        raise
    finally:
        disconnect.cancel()


def build_routes(settings: Settings, worker: InferenceWorker) -> list[HTTPRouteHandler]:
    request_type = generate_request_type(
        max_prompt_chars=settings.max_prompt_chars,
        max_steps=settings.max_steps,
        max_image_size=settings.max_image_size,
    )
    error_responses = {
        code: ResponseSpec(data_container=ErrorResponse, description=text)
        for code, text in {
            400: "The body is not JSON.",
            401: "Missing or wrong API key (only when keys are configured).",
            413: "The body is larger than the configured limit.",
            415: "The Content-Type is not application/json.",
            422: "A field breaks a rule; `detail` names the field and the rule.",
            503: "Queue full, model loading, GPU out of memory or shutting down; see Retry-After.",
            504: "The request deadline passed.",
        }.items()
    }

    async def generate(
        data: GenerateRequestBase, request: Request[Any, Any, Any]
    ) -> Response[bytes]:
        """Generate one square image. The seed used comes back in `X-Seed`."""
        # Litestar has already parsed `data`, but leniently ("5" passes as 5); the API promises
        # that a wrong type is refused, so the cached raw body is decoded again, strictly.
        try:
            data = decode_generate_request(await request.body(), request_type)
        except msgspec.ValidationError as exc:
            raise BadRequestError(describe_validation_error(exc)) from None
        seed = data.seed if data.seed is not None else secrets.randbelow(MAX_SEED + 1)
        params = GenerationParams(
            prompt=data.prompt,
            negative_prompt=data.negative_prompt,
            num_inference_steps=data.num_inference_steps,
            cfg_scale=data.cfg_scale,
            width=data.image_size,
            height=data.image_size,
            seed=seed,
        )
        request_id = current_request_id()
        request_fields: dict[str, object] = {
            "request_id": request_id,
            "seed": seed,
            "width": params.width,
            "height": params.height,
            "steps": params.num_inference_steps,
            "cfg_scale": params.cfg_scale,
            "prompt_chars": len(params.prompt),
        }
        if settings.log_prompts:
            request_fields.update(prompt=params.prompt, negative_prompt=params.negative_prompt)
        # Bound for the error handler's line too, should this request fail further on.
        structlog.contextvars.bind_contextvars(**request_fields)
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        job = Job(
            request_id=request_id,
            params=params,
            future=loop.create_future(),
            loop=loop,
            deadline=now + settings.request_timeout,
            enqueued_at=now,
        )
        worker.submit(job)
        outcome = await _await_outcome(
            job, request, settings.request_timeout + _DEADLINE_GRACE_SECONDS
        )
        encode_started = time.perf_counter()
        # Encoding runs off both the event loop and the inference thread, which is already
        # busy with the next job.
        png = await asyncio.to_thread(encode_png, outcome.result.image, params, settings.model)
        encode_seconds = time.perf_counter() - encode_started
        logger.info(
            "request_completed",
            status=200,
            queue_s=round(outcome.queue_seconds, 4),
            generation_s=round(outcome.generation_seconds, 4),
            encode_s=round(encode_seconds, 4),
            prompt_truncated=outcome.result.prompt_truncated,
            **request_fields,
        )
        return Response(
            png,
            media_type="image/png",
            headers={
                "X-Seed": str(seed),
                "X-Prompt-Truncated": "true" if outcome.result.prompt_truncated else "false",
                "Server-Timing": (
                    f"queue;dur={outcome.queue_seconds * 1000:.1f}, "
                    f"generate;dur={outcome.generation_seconds * 1000:.1f}, "
                    f"encode;dur={encode_seconds * 1000:.1f}"
                ),
            },
        )

    # The annotation carries the configured limits into validation and the OpenAPI schema.
    generate.__annotations__["data"] = Annotated[
        request_type,
        # Unknown fields are refused (forbid_unknown_fields); the schema says so too.
        Body(media_type=RequestEncodingType.JSON, schema_extra={"additionalProperties": False}),
    ]

    async def health() -> Response[HealthResponse]:
        """Ready (200) only when the model is loaded and the inference thread is alive."""
        snapshot = worker.snapshot()
        ready = snapshot.state is WorkerState.READY
        info = snapshot.info
        body = HealthResponse(
            status="ok" if ready else snapshot.state.value,
            model_loaded=info is not None
            and snapshot.state in (WorkerState.READY, WorkerState.DRAINING),
            queue_depth=snapshot.queue_depth,
            queue_capacity=snapshot.capacity,
            running=snapshot.running,
            device=info.device if info else None,
            model=info.model if info else settings.model,
            offload=info.offload if info else None,
            detail=snapshot.detail,
        )
        return Response(body, status_code=200 if ready else 503)

    return [
        post(
            "/generate",
            status_code=200,
            media_type="image/png",
            guards=[require_json_body],
            summary="Generate an image",
            responses=error_responses,
            response_description="The PNG image, with generation parameters in its text chunks.",
        )(generate),
        get(
            "/health",
            opt={PUBLIC: True},
            summary="Readiness and queue depth",
            cache_control=None,
        )(health),
    ]
