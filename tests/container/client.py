"""What a user of the container sees over HTTP: /health, and a PNG from POST /generate."""

import io
import time
from dataclasses import dataclass
from typing import Any

import httpx
from PIL import Image

Health = dict[str, Any]

GENERATE_REQUEST = {
    "prompt": "a red bicycle",
    "num_inference_steps": 2,
    "image_size": 256,
    "seed": 1,
}
GENERATE_TIMEOUT = 120


def loopback_client(base_url: str, timeout: float) -> httpx.Client:
    # trust_env=False: no proxy from the environment stands between the test and the loopback.
    return httpx.Client(base_url=base_url, timeout=timeout, trust_env=False)


def check_health(base_url: str) -> Health:
    with loopback_client(base_url, timeout=10) as client:
        response = client.get("/health")
    assert response.status_code == 200, response.text
    body: Health = response.json()
    assert body.get("status"), body
    assert body.get("model_loaded") is True, body
    return body


@dataclass(frozen=True)
class Generated:
    png: bytes
    seconds: float


def post_generate(base_url: str) -> Generated:
    started = time.monotonic()
    with loopback_client(base_url, timeout=GENERATE_TIMEOUT) as client:
        response = client.post("/generate", json=GENERATE_REQUEST)
    assert response.status_code == 200, response.text
    content_type = response.headers.get("Content-Type", "")
    assert content_type.startswith("image/png"), content_type
    return Generated(response.content, time.monotonic() - started)


def decode_png(data: bytes) -> Image.Image:
    """A full decode: every chunk and its CRC (verify), then every pixel (load)."""
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG", image.format
        image.verify()
    image = Image.open(io.BytesIO(data))
    image.load()
    # 8 bits a channel and no interlacing: what every viewer and browser reads at once.
    assert image.mode in ("RGB", "RGBA"), image.mode
    assert not image.info.get("interlace"), "the PNG is interlaced"
    return image


def assert_generates_the_same_png_for_the_same_seed(base_url: str) -> Generated:
    """A 256x256 PNG that decodes and is not one flat colour; the same bytes again for the
    same seed. Returns the first answer."""
    first = post_generate(base_url)
    image = decode_png(first.png)
    assert image.size == (256, 256), image.size
    assert image.getcolors(maxcolors=1) is None, "the image is one flat colour"
    again = post_generate(base_url)
    assert again.png == first.png, "the same seed gave a different image"
    return first
