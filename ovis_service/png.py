"""PNG encoding with the generation parameters stored as text chunks."""

import io

from PIL import Image, PngImagePlugin

from ovis_service.schemas import GenerationParams


def encode_png(image: Image.Image, params: GenerationParams, model_id: str) -> bytes:
    """Same image and parameters give the same bytes: no timestamps go into the file."""
    info = PngImagePlugin.PngInfo()
    # iTXt keeps non-Latin-1 prompts intact; tEXt would mangle them.
    info.add_itxt("prompt", params.prompt)
    info.add_itxt("negative_prompt", params.negative_prompt)
    info.add_text("seed", str(params.seed))
    info.add_text("num_inference_steps", str(params.num_inference_steps))
    info.add_text("cfg_scale", repr(params.cfg_scale))
    info.add_text("width", str(params.width))
    info.add_text("height", str(params.height))
    info.add_text("model", model_id)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=6)
    return buffer.getvalue()
