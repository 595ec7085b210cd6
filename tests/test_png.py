import io

from PIL import Image
from PIL.PngImagePlugin import PngImageFile

from ovis_service.png import encode_png
from ovis_service.schemas import GenerationParams

PARAMS = GenerationParams(
    prompt="un renard roux sous la neige, 雪の中の狐",
    negative_prompt="flou",
    num_inference_steps=28,
    cfg_scale=4.5,
    width=64,
    height=64,
    seed=2**63 - 1,
)


def image() -> Image.Image:
    return Image.new("RGB", (64, 64), (200, 30, 10))


def test_the_png_carries_every_parameter_including_non_latin_prompts() -> None:
    decoded = Image.open(io.BytesIO(encode_png(image(), PARAMS, "AIDC-AI/Ovis-Image-7B")))
    assert isinstance(decoded, PngImageFile)
    assert decoded.text == {
        "prompt": PARAMS.prompt,
        "negative_prompt": "flou",
        "seed": str(2**63 - 1),
        "num_inference_steps": "28",
        "cfg_scale": "4.5",
        "width": "64",
        "height": "64",
        "model": "AIDC-AI/Ovis-Image-7B",
    }


def test_encoding_is_deterministic() -> None:
    assert encode_png(image(), PARAMS, "m") == encode_png(image(), PARAMS, "m")
