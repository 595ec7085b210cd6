"""The HTTP surfaces, one module each, over `ovis_service.generation`:

- `native`        `POST /generate`: JSON in, PNG/WebP/JPEG or a progress stream out
- `openai`        `/v1/images/generations`, `/v1/models`: OpenAI's Images API, with its body
                  schemas in `openai_schemas` and its translation into jobs in `openai_translation`
- `streaming`     the server-sent events of both
- `respond_async` `Prefer: respond-async` on either API: the request becomes a job
- `jobs`          `/jobs` (follow, list, cancel, delete) and `/images/{token}`; the job's JSON
                  in `job_schemas`
- `ops`           `/health` (readiness), `/livez` (liveness) and `/metrics`
- `page`, `docs`  the playground and the offline API docs
- `errors`        the one exception handler: native and OpenAI error bodies
- `dependencies`  what handlers receive by injection; `common` what every surface shares
"""

from typing import Any

from litestar.types import ControllerRouterHandler

from ovis_service.api.jobs import ImagesController, JobsController
from ovis_service.api.native import NativeController
from ovis_service.api.openai import OpenAIController
from ovis_service.api.openai_schemas import images_request_type
from ovis_service.api.ops import OpsController
from ovis_service.config import Settings
from ovis_service.schemas import generate_request_type

ROUTE_HANDLERS: list[ControllerRouterHandler] = [
    NativeController,
    OpenAIController,
    JobsController,
    ImagesController,
    OpsController,
]


def signature_namespace(settings: Settings) -> dict[str, Any]:
    """The request bodies, built with the configured limits so that validation and the OpenAPI
    schema both show them; the handlers name them and Litestar resolves the names here."""
    return {
        "GenerateRequest": generate_request_type(
            max_prompt_chars=settings.max_prompt_chars,
            max_steps=settings.max_steps,
            max_image_size=settings.max_image_size,
        ),
        "ImagesGenerateRequest": images_request_type(
            max_prompt_chars=settings.max_prompt_chars,
            max_steps=settings.max_steps,
            max_images=settings.max_images_per_request,
            max_image_size=settings.max_image_size,
        ),
    }
