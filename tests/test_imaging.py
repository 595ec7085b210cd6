import io

import numpy as np
import pytest
from PIL import Image

from ovis_service.imaging import FORMATS, ImageFormat, encode_image, read_metadata
from ovis_service.schemas import GenerationParams

PARAMS = GenerationParams(
    prompt="un renard roux sous la neige, 雪の中の狐 <&>",
    negative_prompt="flou",
    num_inference_steps=28,
    cfg_scale=4.5,
    width=64,
    height=48,
    seed=2**63 - 1,
)
EXPECTED = {
    "prompt": PARAMS.prompt,
    "negative_prompt": "flou",
    "seed": str(2**63 - 1),
    "num_inference_steps": "28",
    "cfg_scale": "4.5",
    "width": "64",
    "height": "48",
    "model": "AIDC-AI/Ovis-Image-7B",
}


def image() -> Image.Image:
    # A gradient, so lossy codecs have something to lose.
    ramp = np.linspace(0, 255, 64, dtype=np.uint8)
    return Image.fromarray(np.stack([np.tile(ramp, (48, 1))] * 3, axis=-1))


@pytest.mark.parametrize("image_format", FORMATS)
def test_every_format_carries_every_parameter_including_non_latin_prompts(
    image_format: ImageFormat,
) -> None:
    data = encode_image(image(), PARAMS, "AIDC-AI/Ovis-Image-7B", image_format=image_format)
    assert read_metadata(data) == EXPECTED
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.format == image_format.upper()
        assert decoded.size == (64, 48)


def test_png_is_lossless_and_keeps_the_parameters_as_text_chunks() -> None:
    data = encode_image(image(), PARAMS, "AIDC-AI/Ovis-Image-7B")
    with Image.open(io.BytesIO(data)) as decoded:
        # Read by PIL's own PNG reader, independently of read_metadata.
        assert decoded.text == EXPECTED  # type: ignore[attr-defined]
        assert np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(image()))


@pytest.mark.parametrize("image_format", ["webp", "jpeg"])
def test_lossy_formats_carry_xmp_and_honour_quality(image_format: ImageFormat) -> None:
    low = encode_image(image(), PARAMS, "m", image_format=image_format, quality=5)
    high = encode_image(image(), PARAMS, "m", image_format=image_format, quality=95)
    assert len(low) < len(high)
    with Image.open(io.BytesIO(high)) as decoded:
        xmp = decoded.info["xmp"]
    assert b"<ovis:seed>9223372036854775807</ovis:seed>" in xmp
    assert b"&lt;&amp;&gt;" in xmp  # the prompt's markup is escaped, the packet stays XML


def test_levers_in_force_are_named_in_the_file() -> None:
    data = encode_image(
        image(), PARAMS, "m", image_format="jpeg", levers={"step_cache": "taylorseer", "x": "1"}
    )
    assert read_metadata(data)["levers"] == "step_cache=taylorseer,x=1"


@pytest.mark.parametrize("image_format", FORMATS)
def test_encoding_is_deterministic(image_format: ImageFormat) -> None:
    first = encode_image(image(), PARAMS, "m", image_format=image_format)
    assert first == encode_image(image(), PARAMS, "m", image_format=image_format)


def test_a_jpeg_with_a_huge_prompt_still_encodes_and_says_it_shortened_it() -> None:
    # 10,000 emoji: 120 kB once JSON-escaped, twice what a JPEG segment holds.
    params = GenerationParams(prompt="\U0001f98a" * 10_000, width=64, height=48, seed=1)
    data = encode_image(image(), params, "m", image_format="jpeg")
    metadata = read_metadata(data)
    assert metadata["prompts_shortened"] == "true"
    assert params.prompt.startswith(metadata["prompt"])
    assert 0 < len(metadata["prompt"]) < 10_000
    # WebP has no such limit: the whole prompt travels.
    assert read_metadata(encode_image(image(), params, "m", image_format="webp"))["prompt"] == (
        params.prompt
    )
