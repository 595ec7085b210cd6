"""OpenAI's Images API on the wire, as the official `openai` SDK and Open WebUI speak it.

Every field but `prompt` is optional, and `null` means "not set" (some gateways send it). Unknown
fields are ignored rather than refused: clients add fields faster than servers learn them. The
extensions `negative_prompt`, `num_inference_steps`, `guidance_scale` and `seed` are the names
vLLM-Omni and SGLang use, so one client configuration works against all three.
"""

import re
from typing import Annotated, Any, Literal

import msgspec

from ovis_service.schemas import (
    DEFAULT_IMAGE_SIZE,
    IMAGE_SIZE_STEP,
    MAX_CFG_SCALE,
    MAX_SEED,
    MIN_IMAGE_SIZE,
    NOT_BLANK_PATTERN,
    WebhookUrl,
)

OutputFormat = Literal["png", "jpeg", "webp"]
_SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")
MAX_PARTIAL_IMAGES = 3


class ImagesRequestBase(msgspec.Struct, kw_only=True):
    """The fields come from `images_request_type`, which bakes the configured limits in."""

    prompt: str
    model: str | None
    n: int | None
    size: str | None
    response_format: str | None
    output_format: str | None
    output_compression: int | None
    background: str | None
    quality: str | None
    style: str | None
    moderation: str | None
    user: str | None
    stream: bool | None
    partial_images: int | None
    negative_prompt: str | None
    num_inference_steps: int | None
    guidance_scale: float | None
    seed: int | None
    webhook: str | None


RESPONSE_FORMATS = ("b64_json", "url")
OUTPUT_FORMATS: tuple[OutputFormat, ...] = ("png", "jpeg", "webp")
BACKGROUNDS = ("auto", "opaque", "transparent")
CHOICES: dict[str, tuple[str, ...]] = {
    "response_format": RESPONSE_FORMATS,
    "output_format": OUTPUT_FORMATS,
    "background": BACKGROUNDS,
}


# Known values the service refuses with an explanation of its own (see the handler).
REFUSED = {"background": "transparent"}


def _choice(values: tuple[str, ...]) -> Any:
    """A string checked by the handler against `values`, so the message can list them (msgspec
    would only say "Invalid enum value"). The schema's enum lists what is served, and null."""
    served: list[str | None] = [v for v in values if v not in REFUSED.values()]
    return (
        Annotated[str, msgspec.Meta(extra_json_schema={"extra": {"enum": [*served, None]}})] | None
    )


def _bounded(low: int | float, high: int | float, description: str) -> Any:
    kind = float if isinstance(low, float) else int
    return Annotated[
        kind,
        msgspec.Meta(
            ge=low,
            le=high,
            description=description,
            # Litestar drops bounds of 0 on optional fields; keep them in the schema.
            extra_json_schema={"extra": {"minimum": low, "maximum": high}},
        ),
    ]


def size_pattern(max_image_size: int) -> str:
    """`auto` or `WxH` with each side an allowed value, spelled out so that the schema (and a
    fuzzer reading it) knows exactly which sizes are valid."""
    sides = "|".join(
        str(side) for side in range(MIN_IMAGE_SIZE, max_image_size + 1, IMAGE_SIZE_STEP)
    )
    return f"^(auto|({sides})x({sides}))$"


def images_request_type(
    *, max_prompt_chars: int, max_steps: int, max_images: int, max_image_size: int
) -> type[ImagesRequestBase]:
    text = Annotated[str, msgspec.Meta(max_length=max_prompt_chars)]
    auto_side = min(DEFAULT_IMAGE_SIZE, max_image_size)  # what `parse_size` makes of "auto"
    optional_text = Annotated[str, msgspec.Meta(max_length=256)] | None
    fields: list[tuple[str, Any, Any]] = [
        (
            "prompt",
            Annotated[
                str,
                msgspec.Meta(
                    min_length=1,
                    max_length=max_prompt_chars,
                    description="What to draw. Must not be blank.",
                    extra_json_schema={"extra": {"pattern": NOT_BLANK_PATTERN}},
                ),
            ],
            msgspec.NODEFAULT,
        ),
        ("model", optional_text, None),
        ("n", _bounded(1, max_images, "How many images.") | None, None),
        (
            "size",
            Annotated[
                str,
                msgspec.Meta(
                    max_length=16,
                    description=f'"auto" ({auto_side}x{auto_side}) or "WxH", each side a '
                    f"multiple of {IMAGE_SIZE_STEP} from {MIN_IMAGE_SIZE} to {max_image_size}.",
                    # Schema only: parse_size gives the clearer message.
                    extra_json_schema={"extra": {"pattern": size_pattern(max_image_size)}},
                ),
            ]
            | None,
            None,
        ),
        ("response_format", _choice(RESPONSE_FORMATS), None),
        ("output_format", _choice(OUTPUT_FORMATS), None),
        (
            "output_compression",
            _bounded(0, 100, "JPEG/WebP quality, 0-100.") | None,
            None,
        ),
        ("background", _choice(BACKGROUNDS), None),
        ("quality", optional_text, None),
        ("style", optional_text, None),
        ("moderation", optional_text, None),
        ("user", optional_text, None),
        ("stream", bool | None, None),
        (
            "partial_images",
            _bounded(0, MAX_PARTIAL_IMAGES, "Previews streamed before each image.") | None,
            None,
        ),
        ("negative_prompt", text | None, None),
        ("num_inference_steps", _bounded(1, max_steps, "Denoising steps.") | None, None),
        (
            "guidance_scale",
            _bounded(0.0, MAX_CFG_SCALE, "Guidance scale; 1 or less turns guidance off.") | None,
            None,
        ),
        (
            "seed",
            _bounded(
                0,
                MAX_SEED,
                "Seed of the first image; image i uses seed + i, wrapping to 0 past the largest.",
            )
            | None,
            None,
        ),
        ("webhook", WebhookUrl | None, None),
    ]
    request_type: type[ImagesRequestBase] = msgspec.defstruct(  # type: ignore[assignment]
        "ImagesGenerateRequest", fields, bases=(ImagesRequestBase,), kw_only=True
    )
    return request_type


def parse_size(size: str | None, default: int, max_image_size: int) -> tuple[int, int]:
    """(width, height) from `"auto"` or `"WxH"`; `ValueError` with the allowed range otherwise.
    A size is never silently changed."""
    if size is None or size == "auto":
        return default, default
    rule = (
        f'size must be "auto" or "WIDTHxHEIGHT" with each side a multiple of '
        f"{IMAGE_SIZE_STEP} from {MIN_IMAGE_SIZE} to {max_image_size}, got {size!r}"
    )
    match = _SIZE.fullmatch(size)
    if match is None:
        raise ValueError(rule)
    width, height = int(match[1]), int(match[2])
    for side in (width, height):
        if not MIN_IMAGE_SIZE <= side <= max_image_size or side % IMAGE_SIZE_STEP:
            raise ValueError(rule)
    return width, height


class ImageData(msgspec.Struct, kw_only=True, omit_defaults=True):
    revised_prompt: str | None
    seed: int
    # One of the two, as `response_format` asked.
    b64_json: str | None = None
    url: str | None = None  # a capability URL, valid until OVIS_JOB_TTL has passed


class Usage(msgspec.Struct, kw_only=True):
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    input_tokens_details: dict[str, int] = msgspec.field(
        default_factory=lambda: {"image_tokens": 0, "text_tokens": 0}
    )


class ImagesResponse(msgspec.Struct, kw_only=True):
    created: int
    data: list[ImageData]
    output_format: str
    size: str
    quality: str
    background: str
    usage: Usage


class OpenAIError(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorResponse(msgspec.Struct, kw_only=True):
    error: OpenAIError


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    object: str = "model"
    created: int
    owned_by: str


class ModelList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[ModelCard]
