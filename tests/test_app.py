"""The Litestar app in process, on a fake engine: health states, errors, logs. Request ids have
their own module, test_request_id.py."""

import time
from collections.abc import Iterator

import pytest
from litestar import Litestar
from litestar.testing import TestClient
from structlog.testing import capture_logs

from ovis_service.app import create_app
from ovis_service.config import Settings
from tests.support.fakes import SECRET_IN_ERROR, FakeEngine

BODY = {"prompt": "a fox", "num_inference_steps": 2, "image_size": 256, "seed": 5}


def settings(**overrides: object) -> Settings:
    return Settings(model="fake", warmup=False, **overrides)  # type: ignore[arg-type]


def wait_for_health(client: TestClient[Litestar], status: int) -> dict[str, object]:
    deadline = time.monotonic() + 10
    while True:
        response = client.get("/health")
        if response.status_code == status:
            body: dict[str, object] = response.json()
            return body
        assert time.monotonic() < deadline, response.json()
        time.sleep(0.01)


@pytest.fixture
def client() -> Iterator[TestClient[Litestar]]:
    with TestClient(create_app(settings(), engine=FakeEngine())) as client:
        wait_for_health(client, 200)
        yield client


def test_health_is_503_while_the_model_loads_and_generate_says_so() -> None:
    app = create_app(settings(), engine=FakeEngine(load_seconds=1.0))
    with TestClient(app) as client:
        health = client.get("/health")
        assert health.status_code == 503
        assert health.json()["status"] == "loading"
        assert health.json()["model_loaded"] is False
        refused = client.post("/generate", json=BODY)
        assert refused.status_code == 503
        assert refused.json()["detail"] == "the model is still loading; retry shortly"
        assert refused.headers["retry-after"] == "5"
        ready = wait_for_health(client, 200)
        assert ready["model_loaded"] is True


def test_health_stays_503_when_the_model_fails_to_load() -> None:
    app = create_app(settings(), engine=FakeEngine(load_error=OSError("gone")))
    with TestClient(app) as client:
        body = wait_for_health(client, 503)
        while body["status"] == "loading":
            body = wait_for_health(client, 503)
        assert body["status"] == "failed"
        # The cause (which can name paths on the host) stays in the log and on stderr.
        assert body["detail"] == "model failed to load; the service log names the cause"
        assert client.post("/generate", json=BODY).status_code == 503


def test_an_unexpected_failure_is_a_generic_500_with_the_request_id(
    client: TestClient[Litestar],
) -> None:
    with capture_logs() as logs:
        response = client.post(
            "/generate", json={**BODY, "prompt": "fail now"}, headers={"X-Request-ID": "abc-1"}
        )
    assert response.status_code == 500
    assert response.json() == {
        "detail": "internal error while generating the image",
        "request_id": "abc-1",
    }
    assert SECRET_IN_ERROR not in response.text
    assert "Traceback" not in response.text
    failure = next(log for log in logs if log["event"] == "job_failed")
    assert failure["request_id"] == "abc-1"
    # The worker survives: the next request works.
    assert client.post("/generate", json=BODY).status_code == 200


def test_out_of_memory_is_a_503_with_retry_after_once_memory_was_freed() -> None:
    engine = FakeEngine()
    with TestClient(create_app(settings(), engine=engine)) as client:
        wait_for_health(client, 200)
        response = client.post("/generate", json={**BODY, "prompt": "oom please"})
        assert response.status_code == 503
        assert "ran out of memory" in response.json()["detail"]
        assert int(response.headers["retry-after"]) >= 1
        # The answer comes after the recovery, so a client that retries at once has a chance.
        assert engine.oom_recoveries == 1
        assert client.post("/generate", json=BODY).status_code == 200
        assert engine.oom_recoveries == 1


def test_one_log_line_per_request_without_the_prompt(client: TestClient[Litestar]) -> None:
    with capture_logs() as logs:
        response = client.post("/generate", json={**BODY, "prompt": "a very private prompt"})
    assert response.status_code == 200
    lines = [log for log in logs if log["event"] == "request_completed"]
    assert len(lines) == 1
    line = lines[0]
    assert line["status"] == 200
    assert line["seed"] == 5
    assert (line["width"], line["height"]) == (256, 256)
    assert line["steps"] == 2
    assert line["prompt_chars"] == len("a very private prompt")
    assert line["request_id"] == response.headers["x-request-id"]
    assert {"queue_s", "generation_s"} <= set(line)
    assert not any("a very private prompt" in repr(log) for log in logs)


def test_prompts_are_logged_when_asked_for() -> None:
    app = create_app(settings(log_prompts=True), engine=FakeEngine())
    with TestClient(app) as client:
        wait_for_health(client, 200)
        with capture_logs() as logs:
            client.post("/generate", json={**BODY, "prompt": "log me"})
    line = next(log for log in logs if log["event"] == "request_completed")
    assert line["prompt"] == "log me"


def test_a_rejected_request_is_logged_with_its_status(client: TestClient[Litestar]) -> None:
    with capture_logs() as logs:
        client.post("/generate", json={"prompt": "a", "image_size": 100})
    line = next(log for log in logs if log["event"] == "request_rejected")
    assert line["status"] == 422
    assert line["detail"] == "image_size: Expected int >= 256"


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("application/json", 200),
        ("application/json; charset=utf-8", 200),
        ("Application/JSON", 200),
        ("text/plain", 415),
        ("application/x-www-form-urlencoded", 415),
        (None, 415),
    ],
)
def test_only_a_json_content_type_is_accepted(
    client: TestClient[Litestar],
    content_type: str | None,
    status: int,
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = client.post(
        "/generate",
        content=b'{"prompt": "a", "image_size": 256, "num_inference_steps": 1}',
        headers=headers,
    )
    assert response.status_code == status, response.text
    if status == 415:
        assert response.json()["detail"].startswith("Content-Type must be application/json")


@pytest.mark.parametrize(("host", "warned"), [("0.0.0.0", True), ("127.0.0.1", False)])
def test_serving_beyond_loopback_without_a_key_is_warned_about(host: str, warned: bool) -> None:
    app = create_app(Settings(model="tiny", warmup=False, host=host), engine=FakeEngine())
    with capture_logs() as logs, TestClient(app):
        pass
    warnings = [log for log in logs if log["event"] == "no_api_key"]
    assert bool(warnings) is warned
