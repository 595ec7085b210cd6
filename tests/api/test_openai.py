"""OpenAI's Images API, driven by the official `openai` SDK against the real process."""

import base64
import http.client
import io
import json
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from ovis_service.imaging import read_metadata
from tests.support.service import ServiceProcess, run_service

FAKE_COMMAND = [sys.executable, "-m", "tests.support.fake_service"]
QUICK = {"num_inference_steps": 2}
WAIT = 30.0
# The service counts no tokens, and says so with zeros (None fields are the SDK's own).
ZERO_USAGE = {
    "input_tokens": 0,
    "output_tokens": 0,
    "total_tokens": 0,
    "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
}


@pytest.fixture(scope="module")
def client(tiny_service: ServiceProcess) -> Iterator[openai.OpenAI]:
    # The key is ignored when none is configured, as Open WebUI's empty one must be.
    with openai.OpenAI(base_url=tiny_service.base_url + "/v1", api_key="unused") as client:
        yield client


def decode(b64: str | None) -> tuple[Image.Image, bytes]:
    assert b64 is not None
    data = base64.b64decode(b64)
    return Image.open(io.BytesIO(data)), data


def test_a_png_with_the_sdk_defaults_filled_in(client: openai.OpenAI) -> None:
    result = client.images.generate(prompt="a red fox", size="256x256", extra_body=QUICK)
    assert result.created > 0
    assert (result.output_format, result.size, result.background) == ("png", "256x256", "opaque")
    assert result.quality == "auto"  # the SDK sends none
    assert result.usage is not None
    assert result.usage.model_dump(exclude_none=True) == ZERO_USAGE
    assert result.data is not None
    assert len(result.data) == 1
    image, data = decode(result.data[0].b64_json)
    assert (image.format, image.size) == ("PNG", (256, 256))
    assert result.data[0].revised_prompt is None
    seed = result.data[0].model_extra["seed"]  # type: ignore[index]
    assert isinstance(seed, int)
    assert read_metadata(data)["seed"] == str(seed)


def test_non_square_sizes_are_honoured_exactly(client: openai.OpenAI) -> None:
    result = client.images.generate(prompt="a banner", size="512x256", extra_body=QUICK)  # type: ignore[arg-type]
    assert result.size == "512x256"
    assert result.data is not None
    image, data = decode(result.data[0].b64_json)
    assert image.size == (512, 256)
    assert (read_metadata(data)["width"], read_metadata(data)["height"]) == ("512", "256")


def test_n_images_with_seeds_counting_up_and_reproducible(client: openai.OpenAI) -> None:
    raw = client.images.with_raw_response.generate(
        prompt="a lighthouse", n=2, size="256x256", extra_body={**QUICK, "seed": 41}
    )
    assert raw.headers["x-seed"] == "41"
    first = raw.parse()
    assert first.data is not None
    assert [item.model_extra["seed"] for item in first.data] == [41, 42]  # type: ignore[index]
    again = client.images.generate(
        prompt="a lighthouse", n=1, size="256x256", extra_body={**QUICK, "seed": 42}
    )
    assert again.data is not None
    # Image 1 of the first call used seed 42: the same seed gives the same file.
    assert again.data[0].b64_json == first.data[1].b64_json
    assert first.data[0].b64_json != first.data[1].b64_json


@pytest.mark.parametrize(("output_format", "pil_format"), [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_formats_with_compression(
    client: openai.OpenAI, output_format: str, pil_format: str
) -> None:
    result = client.images.generate(
        prompt="a cat",
        size="256x256",
        output_format=output_format,  # type: ignore[arg-type]
        output_compression=50,
        extra_body={**QUICK, "seed": 3},
    )
    assert result.output_format == output_format
    assert result.data is not None
    image, data = decode(result.data[0].b64_json)
    assert image.format == pil_format
    assert read_metadata(data)["seed"] == "3"


@pytest.mark.parametrize("output_format", ["jpeg", "webp"])
def test_output_compression_sets_the_encoders_quality(
    client: openai.OpenAI, output_format: str
) -> None:
    sizes = {}
    for compression in (10, 95):
        # The same seed, so the same pixels: only the encoder's quality differs.
        result = client.images.generate(
            prompt="a cat",
            size="256x256",
            output_format=output_format,  # type: ignore[arg-type]
            output_compression=compression,
            extra_body={**QUICK, "seed": 3},
        )
        assert result.data is not None
        _, data = decode(result.data[0].b64_json)
        sizes[compression] = len(data)
    # The tiny model paints noise, which a high quality keeps at a cost of many more bytes.
    assert sizes[95] > 2 * sizes[10], sizes


def test_the_requests_open_webui_sends_work(tiny_service: ServiceProcess) -> None:
    # Model dall-e-2, size 512x512, b64_json, and an empty bearer token ("Bearer " with its
    # trailing space, which httpx refuses to send, hence http.client); the knobs it can add come
    # from IMAGES_OPENAI_API_PARAMS.
    body = {
        "model": "dall-e-2",
        "prompt": "a boat",
        "n": 1,
        "size": "512x512",
        "response_format": "b64_json",
        "num_inference_steps": 1,
    }
    host, port = tiny_service.base_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        connection.request(
            "POST",
            "/v1/images/generations",
            body=json.dumps(body),
            headers={"Content-Type": "application/json", "Authorization": "Bearer "},
        )
        response = connection.getresponse()
        payload = response.read()
    finally:
        connection.close()
    assert response.status == 200, payload
    image, _ = decode(json.loads(payload)["data"][0]["b64_json"])
    assert image.size == (512, 512)


@pytest.mark.parametrize(
    ("arguments", "param", "words"),
    [
        ({"size": "1000x1000"}, "size", "multiple of 16"),
        ({"size": "4096x256"}, "size", "from 256 to 2048"),
        ({"size": "big"}, "size", "WIDTHxHEIGHT"),
        ({"n": 0}, "n", ">= 1"),
        ({"n": 5}, "n", "<= 4"),
        ({"response_format": "url", "stream": True}, "response_format", "cannot be streamed"),
        ({"background": "transparent"}, "background", "opaque"),
        ({"output_format": "gif"}, "output_format", "png"),
        ({"output_compression": 101}, "output_compression", "<= 100"),
        ({"partial_images": 4}, "partial_images", "<= 3"),
        ({"prompt": "   "}, "prompt", "non-whitespace"),
        ({"extra_body": {"num_inference_steps": 0}}, "num_inference_steps", ">= 1"),
        ({"extra_body": {"guidance_scale": 21}}, "guidance_scale", "<= 20"),
        ({"extra_body": {"seed": -1}}, "seed", ">= 0"),
        ({"extra_body": {"seed": "5"}}, "seed", "Expected int"),
    ],
)
def test_bad_input_raises_the_sdks_bad_request_error_naming_the_param(
    client: openai.OpenAI, arguments: dict[str, object], param: str, words: str
) -> None:
    call: dict[str, object] = {"prompt": "a fox", **arguments}
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(**call)  # type: ignore[arg-type]
    error = caught.value
    assert error.status_code == 400
    assert error.param == param
    assert error.type == "invalid_request_error"
    assert words in error.message


def test_models_list_and_card(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [model.id for model in models.data] == ["tiny"]
    card = client.models.retrieve("tiny")
    assert (card.id, card.object) == ("tiny", "model")
    assert isinstance(card.created, int)
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-image-1")
    assert caught.value.param == "model"


def test_streaming_sends_partial_images_then_the_completed_image(client: openai.OpenAI) -> None:
    stream = client.images.generate(
        prompt="a mountain",
        size="256x256",
        stream=True,
        partial_images=2,
        extra_body={"num_inference_steps": 6, "seed": 9},
    )
    events = list(stream)
    types = [event.type for event in events]
    assert types == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    assert [event.partial_image_index for event in events[:2]] == [0, 1]  # type: ignore[union-attr]
    for event in events:
        image, _ = decode(event.b64_json)
        assert image.size == (256, 256)
        assert (event.size, event.output_format, event.background) == ("256x256", "png", "opaque")
    completed = events[-1]
    assert completed.quality == "auto"
    assert completed.usage.model_dump(exclude_none=True) == ZERO_USAGE  # type: ignore[union-attr]
    # The streamed image is the image the same request gives without streaming.
    plain = client.images.generate(
        prompt="a mountain", size="256x256", extra_body={"num_inference_steps": 6, "seed": 9}
    )
    assert plain.data is not None
    assert plain.data[0].b64_json == completed.b64_json


def test_a_stream_of_n_images_completes_each_with_its_own_seed_and_metadata(
    client: openai.OpenAI,
) -> None:
    arguments: dict[str, Any] = {
        "prompt": "a harbour",
        "n": 2,
        "size": "256x256",
        "extra_body": {**QUICK, "seed": 41},
    }
    events = list(client.images.generate(**arguments, stream=True))
    assert [event.type for event in events] == ["image_generation.completed"] * 2
    streamed = {}
    for event in events:
        seed = event.model_extra["seed"]  # type: ignore[index]
        _, data = decode(event.b64_json)
        # The image says the seed its event says: each image's own parameters, not the first's.
        assert read_metadata(data)["seed"] == str(seed)
        streamed[seed] = event.b64_json
    assert sorted(streamed) == [41, 42]
    # Each streamed image is the one its seed makes without streaming.
    plain = client.images.generate(**arguments)
    assert plain.data is not None
    assert streamed == {item.model_extra["seed"]: item.b64_json for item in plain.data}  # type: ignore[index]


@pytest.fixture(scope="module")
def hold_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Created by a test to release the keyed service's `held...` jobs."""
    return tmp_path_factory.mktemp("hold") / "release"


@pytest.fixture(scope="module")
def keyed_busy_service(
    tmp_path_factory: pytest.TempPathFactory, hold_file: Path
) -> Iterator[ServiceProcess]:
    """A fake engine (fast to start) behind an API key: one inference thread and one queue
    place, so two requests fill it."""
    env = {
        "OVIS_API_KEY": "sesame",
        "OVIS_QUEUE_SIZE": "1",
        "FAKE_STEP_SECONDS": "0.05",
        "FAKE_HOLD_FILE": str(hold_file),
    }
    with run_service(tmp_path_factory.mktemp("keyed"), command=FAKE_COMMAND, env=env) as service:
        yield service


def test_a_failure_after_the_stream_began_raises_in_the_sdk(
    keyed_busy_service: ServiceProcess,
) -> None:
    url = keyed_busy_service.base_url + "/v1"
    with openai.OpenAI(base_url=url, api_key="sesame", max_retries=0) as client:
        # The fake engine fails prompts that start with "fail", after the 200 went out.
        stream = client.images.generate(prompt="fail please", stream=True)
        with pytest.raises(openai.APIError) as caught:
            list(stream)
    assert "internal error" in caught.value.message
    assert "/srv/secret" not in caught.value.message


def test_a_missing_or_wrong_key_is_401_in_openais_shape(
    keyed_busy_service: ServiceProcess,
) -> None:
    url = keyed_busy_service.base_url + "/v1"
    with (
        openai.OpenAI(base_url=url, api_key="wrong") as client,
        pytest.raises(openai.AuthenticationError) as caught,
    ):
        client.images.generate(prompt="a fox")
    assert caught.value.status_code == 401
    # The SDK refuses to send no key at all; other clients do.
    response = httpx.post(url + "/images/generations", json={"prompt": "a fox"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_a_full_queue_is_503_with_retry_after_and_never_half_served(
    keyed_busy_service: ServiceProcess, tmp_path: Path
) -> None:
    url = keyed_busy_service.base_url
    headers = {"Authorization": "Bearer sesame"}
    with (
        openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0) as client,
        httpx.Client(base_url=url, headers=headers, timeout=60) as http,
    ):
        # Three images for one idle thread and one queue place: refused whole, nothing queued.
        with pytest.raises(openai.InternalServerError) as caught:
            client.images.generate(prompt="three", n=3, extra_body={"num_inference_steps": 5})
        assert caught.value.status_code == 503
        assert int(caught.value.response.headers["retry-after"]) >= 1
        assert caught.value.body["code"] == "queue_full"  # type: ignore[index]
        health = http.get("/health").json()
        assert (health["queue_depth"], health["running"]) == (0, 0)


def _post_held(service: ServiceProcess) -> int:
    with service.client(headers={"Authorization": "Bearer sesame"}) as http:
        body = {"prompt": "held", "num_inference_steps": 2, "image_size": 256}
        return http.post("/generate", json=body).status_code


def _wait_for_health(service: ServiceProcess, predicate: Any) -> None:
    deadline = time.monotonic() + WAIT
    with service.client() as http:
        while not predicate(body := http.get("/health").json()):
            assert time.monotonic() < deadline, body
            time.sleep(0.02)


def test_the_sdk_waits_out_retry_after_on_a_full_queue_then_gets_through(
    keyed_busy_service: ServiceProcess, hold_file: Path
) -> None:
    # What the SDK sent and heard: (when, status, Retry-After) per answer, when per attempt.
    answers: list[tuple[float, int, str | None]] = []
    attempts: list[float] = []
    refused = threading.Event()

    def heard(response: Any) -> None:
        answers.append(
            (time.monotonic(), response.status_code, response.headers.get("retry-after"))
        )
        if response.status_code == 503:
            refused.set()

    http_client = openai.DefaultHttpxClient(
        event_hooks={
            "request": [lambda _request: attempts.append(time.monotonic())],
            "response": [heard],
        }
    )
    url = keyed_busy_service.base_url + "/v1"
    with (
        ThreadPoolExecutor(3) as pool,
        openai.OpenAI(base_url=url, api_key="sesame", http_client=http_client) as retrying,
    ):
        try:
            # One thread and one queue place: a held job on each fills the service.
            held = [pool.submit(_post_held, keyed_busy_service)]
            _wait_for_health(keyed_busy_service, lambda body: body["running"] == 1)
            held.append(pool.submit(_post_held, keyed_busy_service))
            _wait_for_health(keyed_busy_service, lambda body: body["queue_depth"] == 1)
            call = pool.submit(
                retrying.images.with_raw_response.generate,
                prompt="one",
                size="256x256",
                extra_body={"num_inference_steps": 2},
            )
            assert refused.wait(WAIT), answers
        finally:
            # Room again, well within the shortest Retry-After of one second.
            hold_file.touch()
        raw = call.result(WAIT + 120)
        assert [future.result(WAIT) for future in held] == [200, 200]
    assert [status for _, status, _ in answers] == [503, 200]
    assert raw.retries_taken == 1
    refused_at, _, retry_after = answers[0]
    assert retry_after is not None
    assert 1 <= int(retry_after) <= 120  # the SDK gives up at once past 120 s
    # The SDK waited as long as it was told before it asked again.
    assert attempts[1] - refused_at >= int(retry_after) - 0.05
    result = raw.parse()
    assert result.data is not None
    assert len(result.data) == 1
