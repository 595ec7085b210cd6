"""End to end: the `ovis-service` process with the tiny real pipeline, over real HTTP."""

import io
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngImageFile

from tests.support.service import ServiceProcess, run_service

SMALL = {"num_inference_steps": 2, "image_size": 256}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    with run_service(tmp_path_factory.mktemp("e2e")) as service:
        yield service


@pytest.fixture
def client(service: ServiceProcess) -> Iterator[httpx.Client]:
    with service.client() as client:
        yield client


def test_health_reports_the_loaded_model_and_the_queue(client: httpx.Client) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["model_loaded"] is True
    assert body["queue_depth"] == 0
    assert body["queue_capacity"] == 8
    assert body["device"] == "cpu"
    assert body["model"] == "tiny"
    assert body["levers"]["compile"] == "none"  # the levers in force, as the images say too


def test_generate_returns_a_png_with_its_parameters(client: httpx.Client) -> None:
    response = client.post(
        "/generate",
        json={
            "prompt": "a lighthouse at dusk",
            "negative_prompt": "blur",
            "seed": 42,
            "cfg_scale": 4.5,
            **SMALL,
        },
        headers={"X-Request-ID": "my-request-1"},
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-seed"] == "42"
    assert response.headers["x-request-id"] == "my-request-1"
    assert response.headers["x-prompt-truncated"] == "false"
    timing = response.headers["server-timing"]
    assert "queue;dur=" in timing
    assert "generate;dur=" in timing
    image = Image.open(io.BytesIO(response.content))
    assert isinstance(image, PngImageFile)
    assert image.size == (256, 256)
    levers = image.text.pop("levers")
    # How the image was made.
    assert "compile=" in levers
    assert "step_cache=" in levers
    assert image.text == {
        "prompt": "a lighthouse at dusk",
        "negative_prompt": "blur",
        "seed": "42",
        "num_inference_steps": "2",
        "cfg_scale": "4.5",
        "width": "256",
        "height": "256",
        "model": "tiny",
    }


def test_the_same_seed_gives_byte_identical_pngs(client: httpx.Client) -> None:
    body = {"prompt": "a bowl of ramen", "seed": 1234, **SMALL}
    first = client.post("/generate", json=body)
    second = client.post("/generate", json=body)
    other = client.post("/generate", json={**body, "seed": 1235})
    assert first.status_code == second.status_code == other.status_code == 200
    assert first.content == second.content
    assert first.content != other.content


def test_a_server_picked_seed_reproduces_the_image(client: httpx.Client) -> None:
    body = {"prompt": "an astronaut riding a horse", **SMALL}
    first = client.post("/generate", json=body)
    assert first.status_code == 200
    seed = int(first.headers["x-seed"])
    again = client.post("/generate", json={**body, "seed": seed})
    assert again.content == first.content
    image = Image.open(io.BytesIO(first.content))
    assert isinstance(image, PngImageFile)
    assert image.text["seed"] == str(seed)


def test_a_prompt_past_the_token_limit_is_flagged(client: httpx.Client) -> None:
    prompt = " ".join(f"w{i}" for i in range(600))
    response = client.post("/generate", json={"prompt": prompt[:2000], **SMALL})
    assert response.status_code == 200
    assert response.headers["x-prompt-truncated"] == "true"


@pytest.mark.parametrize(
    ("content", "status", "detail"),
    [
        (b'{"prompt": "   "}', 422, "prompt must contain at least one non-whitespace character"),
        (
            b'{"prompt": "a", "image_size": 1000}',
            422,
            "image_size: Expected int that's a multiple of 16",
        ),
        (
            b'{"prompt": "a", "num_inference_steps": 0}',
            422,
            "num_inference_steps: Expected int >= 1",
        ),
        (
            b'{"prompt": "a", "num_inference_steps": 101}',
            422,
            "num_inference_steps: Expected int <= 100",
        ),
        (b'{"prompt": "a", "cfg_scale": 21}', 422, "cfg_scale: Expected float <= 20.0"),
        (b'{"prompt": "a", "seed": -5}', 422, "seed: Expected int >= 0"),
        (b'{"prompt": "a", "seed": "5"}', 422, "seed: Expected int | null, got str"),
        (
            b'{"prompt": "a", "steps": 2}',
            422,
            "Object contains unknown field steps; did you mean num_inference_steps?",
        ),
        (b'{"negative_prompt": "a"}', 422, "Object missing required field prompt"),
        (b'{"prompt": "a", "cfg_scale": NaN}', 400, "JSON is malformed"),
        (b'{"prompt": ', 400, "Input data was truncated"),
        (b"", 400, "the request body is empty"),
        (b"[1, 2]", 422, "Expected object, got array"),
    ],
)
def test_bad_input_gets_a_4xx_naming_the_field_and_rule(
    client: httpx.Client, content: bytes, status: int, detail: str
) -> None:
    response = client.post(
        "/generate", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == status, response.text
    body = response.json()
    assert detail in body["detail"]
    assert body["request_id"] == response.headers["x-request-id"]


def test_a_prompt_over_the_length_limit_is_refused(client: httpx.Client) -> None:
    response = client.post("/generate", json={"prompt": "x" * 2001})
    assert response.status_code == 422
    assert response.json()["detail"] == "prompt: Expected str of length <= 2000"


def test_the_openapi_schema_shows_the_limits(client: httpx.Client) -> None:
    schema = client.get("/schema/openapi.json").json()
    request = schema["components"]["schemas"]["GenerateRequest"]["properties"]
    assert request["num_inference_steps"]["maximum"] == 100
    assert request["image_size"]["maximum"] == 2048
    assert request["image_size"]["multipleOf"] == 16
    assert request["prompt"]["maxLength"] == 2000


def test_a_full_queue_answers_503_with_retry_after_at_once(tmp_path: Path) -> None:
    slow = {"prompt": "a slow one", "num_inference_steps": 12, "image_size": 512, "seed": 1}
    with run_service(tmp_path, env={"OVIS_QUEUE_SIZE": "1"}) as service:
        with ThreadPoolExecutor(max_workers=6) as pool, service.client(timeout=120) as client:
            responses = list(pool.map(lambda _: client.post("/generate", json=slow), range(6)))
        statuses = sorted(response.status_code for response in responses)
        refused = [response for response in responses if response.status_code == 503]
        # One job runs and one waits; everything beyond that is refused, never queued forever.
        assert statuses.count(200) >= 2
        assert len(refused) >= 1
        assert set(statuses) <= {200, 503}
        for response in refused:
            assert int(response.headers["retry-after"]) >= 1
            assert response.json()["detail"] == "the queue is full; retry later"
            assert response.elapsed.total_seconds() < 5


def test_sigterm_lets_running_and_queued_generations_finish_then_exits_0(tmp_path: Path) -> None:
    body = {"prompt": "finish me", "num_inference_steps": 8, "image_size": 512, "seed": 3}
    with run_service(tmp_path) as service:
        results: list[httpx.Response] = []

        def request() -> None:
            with service.client(timeout=120) as client:
                results.append(client.post("/generate", json=body))

        threads = [threading.Thread(target=request) for _ in range(2)]
        for thread in threads:
            thread.start()
        # SIGTERM only once one job runs and the other waits, so both paths are exercised.
        deadline = time.monotonic() + 30
        with service.client() as client:
            while True:
                health = client.get("/health").json()
                if health["running"] == 1 and health["queue_depth"] == 1:
                    break
                assert time.monotonic() < deadline, health
                time.sleep(0.02)
        service.process.send_signal(signal.SIGTERM)
        exit_code = service.process.wait(timeout=120)
        for thread in threads:
            thread.join(timeout=60)
    assert exit_code == 0, service.raw_log()[-3000:]
    assert [response.status_code for response in results] == [200, 200]
    assert all(response.content.startswith(b"\x89PNG") for response in results)
    events = [line["event"] for line in service.logs()]
    assert events.index("drain_started") < events.index("inference_thread_stopped")
    assert events[-1] == "exited_clean"
