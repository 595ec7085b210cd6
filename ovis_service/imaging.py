"""Image files: PNG, WebP and JPEG, each carrying the generation parameters in its metadata.

PNG keeps them as text chunks (what A1111-style tools read); JPEG and WebP, which have no text
chunks, carry the same fields as JSON in EXIF `ImageDescription` and as an XMP packet.
"""

import io
import json
from collections.abc import Mapping
from typing import Literal
from xml.sax.saxutils import escape

from PIL import Image, PngImagePlugin

from ovis_service.schemas import GenerationParams

ImageFormat = Literal["png", "webp", "jpeg"]
FORMATS: tuple[ImageFormat, ...] = ("png", "webp", "jpeg")
MEDIA_TYPES: dict[ImageFormat, str] = {
    "png": "image/png",
    "webp": "image/webp",
    "jpeg": "image/jpeg",
}
_EXIF_IMAGE_DESCRIPTION = 0x010E
_EXIF_SOFTWARE = 0x0131
SOFTWARE = "ovis-service"
# Below the 65,533 bytes a JPEG segment can hold, with room for the EXIF and XMP framing.
_JPEG_SEGMENT_BUDGET = 60_000


def metadata_fields(
    params: GenerationParams, model_id: str, levers: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Everything needed to make the image again, as strings."""
    fields = {
        "prompt": params.prompt,
        "negative_prompt": params.negative_prompt,
        "seed": str(params.seed),
        "num_inference_steps": str(params.num_inference_steps),
        "cfg_scale": repr(params.cfg_scale),
        "width": str(params.width),
        "height": str(params.height),
        "model": model_id,
    }
    if levers:
        # How the image was made (compile, attention backend, step cache, ...): lossy levers
        # change pixels, so an image must say which were in force.
        fields["levers"] = ",".join(f"{name}={value}" for name, value in sorted(levers.items()))
    return fields


def encode_image(
    image: Image.Image,
    params: GenerationParams,
    model_id: str,
    *,
    image_format: ImageFormat = "png",
    quality: int = 90,
    levers: Mapping[str, str] | None = None,
) -> bytes:
    """Same image and parameters give the same bytes: no timestamps go into the file."""
    fields = metadata_fields(params, model_id, levers)
    buffer = io.BytesIO()
    if image_format == "png":
        info = PngImagePlugin.PngInfo()
        for key, value in fields.items():
            # iTXt keeps non-Latin-1 prompts intact; tEXt would mangle them.
            info.add_itxt(key, value)
        image.save(buffer, format="PNG", pnginfo=info, compress_level=6)
        return buffer.getvalue()
    if image_format == "jpeg":
        fields = _fit_jpeg_segment(fields)
    exif = Image.Exif()
    # EXIF ASCII fields are 7-bit by the letter of the standard; JSON's \\u escapes keep any
    # prompt intact inside that.
    exif[_EXIF_IMAGE_DESCRIPTION] = _exif_text(fields)
    exif[_EXIF_SOFTWARE] = SOFTWARE
    image.save(
        buffer,
        format="WEBP" if image_format == "webp" else "JPEG",
        quality=quality,
        exif=exif.tobytes(),
        xmp=_xmp_packet(fields),
    )
    return buffer.getvalue()


def _exif_text(fields: Mapping[str, str]) -> str:
    return json.dumps(fields, ensure_ascii=True, sort_keys=True)


def _fit_jpeg_segment(fields: Mapping[str, str]) -> dict[str, str]:
    """A JPEG keeps EXIF and XMP in segments of at most 64 KiB. A prompt that long (possible
    with a raised OVIS_MAX_PROMPT_CHARS, or many characters outside the BMP, which JSON spells
    in 12 bytes) is shortened in the metadata, and the file says so, rather than failing the
    request after the GPU work is done."""
    fitted = dict(fields)
    while max(len(_exif_text(fitted)), len(_xmp_packet(fitted))) > _JPEG_SEGMENT_BUDGET:
        for key in ("prompt", "negative_prompt"):
            fitted[key] = fitted[key][: len(fitted[key]) // 2]
        fitted["prompts_shortened"] = "true"
    return fitted


def read_metadata(data: bytes) -> dict[str, str]:
    """The generation parameters stored by `encode_image`, whatever the format."""
    with Image.open(io.BytesIO(data)) as image:
        if image.format == "PNG":
            return {str(k): str(v) for k, v in image.info.items() if isinstance(v, str)}
        description = image.getexif().get(_EXIF_IMAGE_DESCRIPTION)
    if not isinstance(description, str):
        return {}
    parsed = json.loads(description)
    return {str(k): str(v) for k, v in parsed.items()}


def _xmp_packet(fields: Mapping[str, str]) -> bytes:
    properties = "".join(
        f"<ovis:{key}>{escape(value)}</ovis:{key}>" for key, value in fields.items()
    )
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">'
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:ovis="https://github.com/AIDC-AI/Ovis-Image/ns/1.0/">'
        f"{properties}"
        "</rdf:Description></rdf:RDF></x:xmpmeta>"
        '<?xpacket end="r"?>'
    ).encode()
