"""The native `/generate` over real HTTP: Accept negotiation, width and height, the SSE stream."""

import base64
import io
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from ovis_service.imaging import read_metadata
from tests.support.service import ServiceProcess
from tests.support.sse import read_events

QUICK = {"prompt": "a fox", "num_inference_steps": 2, "image_size": 256, "seed": 11}


@pytest.fixture(scope="module")
def client(tiny_service: ServiceProcess) -> Iterator[httpx.Client]:
    with tiny_service.client(timeout=120) as client:
        yield client


@pytest.mark.parametrize(
    ("accept", "media_type", "pil_format"),
    [
        (None, "image/png", "PNG"),
        ("*/*", "image/png", "PNG"),
        ("image/png", "image/png", "PNG"),
        ("image/webp", "image/webp", "WEBP"),
        ("image/jpeg", "image/jpeg", "JPEG"),
        ("image/avif, image/webp;q=0.8, */*;q=0.1", "image/webp", "WEBP"),
    ],
)
def test_accept_picks_the_format_and_the_metadata_travels(
    client: httpx.Client, accept: str | None, media_type: str, pil_format: str
) -> None:
    headers = {"Accept": accept} if accept else {}
    response = client.post("/generate", json=QUICK, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == media_type
    assert Image.open(io.BytesIO(response.content)).format == pil_format
    assert read_metadata(response.content)["seed"] == "11"


def test_an_accept_allowing_no_format_is_406_naming_the_choices(client: httpx.Client) -> None:
    response = client.post("/generate", json=QUICK, headers={"Accept": "application/json"})
    assert response.status_code == 406
    assert "image/webp" in response.json()["detail"]


@pytest.mark.parametrize("accept", ["*/*;q=1e999", "image/png;q=inf"])
def test_an_unparsable_accept_is_a_400_not_a_crash(client: httpx.Client, accept: str) -> None:
    response = client.post("/generate", json=QUICK, headers={"Accept": accept})
    assert response.status_code == 400
    assert "Accept" in response.json()["detail"]


def test_width_and_height_make_a_non_square_image(client: httpx.Client) -> None:
    response = client.post("/generate", json={**QUICK, "width": 512, "height": 256})
    assert response.status_code == 200, response.text
    assert Image.open(io.BytesIO(response.content)).size == (512, 256)
    metadata = read_metadata(response.content)
    assert (metadata["width"], metadata["height"]) == ("512", "256")


def test_one_side_given_keeps_image_size_for_the_other(client: httpx.Client) -> None:
    response = client.post("/generate", json={**QUICK, "height": 320})
    assert Image.open(io.BytesIO(response.content)).size == (256, 320)


@pytest.mark.parametrize(
    ("fields", "detail"),
    [
        ({"width": 264}, "width: Expected int that's a multiple of 16"),
        ({"height": 4096}, "height: Expected int <= 2048"),
        ({"width": 128}, "width: Expected int >= 256"),
    ],
)
def test_bad_sides_are_422_naming_the_field(
    client: httpx.Client, fields: dict[str, object], detail: str
) -> None:
    response = client.post("/generate", json={**QUICK, **fields})
    assert response.status_code == 422
    assert response.json()["detail"] == detail


def test_the_stream_reports_each_step_then_the_image(client: httpx.Client) -> None:
    body = {**QUICK, "num_inference_steps": 4}
    with client.stream(
        "POST", "/generate", json=body, headers={"Accept": "text/event-stream"}
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-seed"] == "11"
        events = read_events(response)
    names = [name for name, _ in events]
    assert names == ["progress"] * 4 + ["image"]
    assert [data for _, data in events[:4]] == [{"step": i, "total": 4} for i in range(1, 5)]
    image = events[-1][1]
    assert (image["seed"], image["format"]) == (11, "png")
    png = base64.b64decode(str(image["b64_json"]))
    # Streaming changes nothing about the image itself.
    assert png == client.post("/generate", json=body).content


def test_errors_before_the_stream_are_plain_http(client: httpx.Client) -> None:
    response = client.post(
        "/generate", json={"prompt": " "}, headers={"Accept": "text/event-stream"}
    )
    assert response.status_code == 422
    assert response.json()["detail"].startswith("prompt")
