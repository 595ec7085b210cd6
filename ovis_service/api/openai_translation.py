"""OpenAI's image request, translated into the jobs the service runs: a pure function of the body
and the settings, testable without HTTP. Anything the service cannot do is a `BadRequestError`
naming the field, which the exception handler turns into OpenAI's 400."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from ovis_service.api.common import draw_seed
from ovis_service.api.openai_schemas import CHOICES, ImagesRequestBase, parse_size
from ovis_service.config import Settings
from ovis_service.errors import BadRequestError
from ovis_service.imaging import ImageFormat
from ovis_service.schemas import (
    DEFAULT_CFG_SCALE,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_STEPS,
    MAX_SEED,
    GenerationParams,
)


@dataclass(frozen=True)
class ImagesPlan:
    """What one `POST /v1/images/generations` asks of the service."""

    params: list[GenerationParams]  # one job per image
    image_format: ImageFormat
    encode_quality: int | None  # `output_compression`; None means the configured one
    stream: bool
    urls: bool  # `response_format: "url"`: images are stored and answered by URL
    preview_steps: frozenset[int]  # steps after which a streamed request gets a partial image
    # The response fields every answer repeats: output_format, size, quality, background.
    echo: dict[str, str]


def translate(
    data: ImagesRequestBase, settings: Settings, draw: Callable[[], int] = draw_seed
) -> ImagesPlan:
    _refuse_what_is_not_served(data)
    try:
        width, height = parse_size(
            data.size, min(DEFAULT_IMAGE_SIZE, settings.max_image_size), settings.max_image_size
        )
    except ValueError as exc:
        raise BadRequestError(str(exc), param="size") from None
    steps = data.num_inference_steps or min(DEFAULT_STEPS, settings.max_steps)
    first_seed = data.seed
    params = [
        GenerationParams(
            prompt=data.prompt,
            negative_prompt=data.negative_prompt or "",
            num_inference_steps=steps,
            cfg_scale=data.guidance_scale if data.guidance_scale is not None else DEFAULT_CFG_SCALE,
            width=width,
            height=height,
            # Image i uses seed + i, wrapping past the largest seed, so that every seed the
            # schema accepts works with every n.
            seed=(first_seed + index) % (MAX_SEED + 1) if first_seed is not None else draw(),
        )
        for index in range(data.n if data.n is not None else 1)
    ]
    image_format = cast(ImageFormat, data.output_format or "png")
    stream = bool(data.stream)
    return ImagesPlan(
        params=params,
        image_format=image_format,
        encode_quality=data.output_compression,
        stream=stream,
        urls=data.response_format == "url",
        preview_steps=preview_steps(data.partial_images or 0, steps) if stream else frozenset(),
        echo={
            "output_format": image_format,
            "size": f"{width}x{height}",
            "quality": data.quality or "auto",
            "background": "opaque",
        },
    )


def preview_steps(partial_images: int, steps: int) -> frozenset[int]:
    """Spread the previews evenly over the run, before the last step (which is the image)."""
    return frozenset(
        step
        for k in range(1, partial_images + 1)
        if 1 <= (step := k * steps // (partial_images + 1)) < steps
    )


def _refuse_what_is_not_served(data: ImagesRequestBase) -> None:
    for name, allowed in CHOICES.items():
        value = getattr(data, name)
        if value is not None and value not in allowed:
            raise BadRequestError(
                f"{name} must be one of {', '.join(allowed)}; got {value!r}", param=name
            )
    if not data.prompt.strip():
        raise BadRequestError(
            "prompt must contain at least one non-whitespace character", param="prompt"
        )
    if data.response_format == "url" and data.stream:
        raise BadRequestError(
            'response_format "url" cannot be streamed: a stream carries the images themselves; '
            'leave out "stream", or ask for "b64_json"',
            param="response_format",
        )
    if data.background == "transparent":
        raise BadRequestError(
            'background "transparent" is not supported: the model paints opaque images; '
            'use "auto" or "opaque"',
            param="background",
        )
