"""The native event stream (`Accept: text/event-stream`) when the job fails after the 200 went
out: the stream ends with an `error` event, `{detail, request_id}`. In process, on a fake engine
that breaks mid-run; the OpenAI stream's failure event is checked through the SDK in
test_openai.py."""

from collections.abc import Iterator
from dataclasses import replace

import pytest
from litestar import Litestar
from litestar.testing import TestClient
from structlog.testing import capture_logs

from ovis_service.app import create_app
from ovis_service.config import Settings
from ovis_service.engine import GenerationResult, StepHooks
from ovis_service.schemas import GenerationParams
from tests.support.fakes import SECRET_IN_ERROR, FakeEngine
from tests.support.in_process import ready_client
from tests.support.sse import read_events

pytestmark = pytest.mark.timeout(60)

BODY = {"prompt": "a fox", "num_inference_steps": 4, "image_size": 256, "seed": 5}
STREAM = {"Accept": "text/event-stream"}
BREAK_AT_STEP = 2
REQUEST_TIMEOUT = 1.0


class MidRunFailureEngine(FakeEngine):
    """`breaks...` prompts raise once their second step has been reported, so the client has
    already read progress events when the failure comes."""

    def generate(self, params: GenerationParams, hooks: StepHooks) -> GenerationResult:
        if not params.prompt.startswith("breaks"):
            return super().generate(params, hooks)

        def on_progress(done: int, total: int) -> None:
            hooks.on_progress(done, total)
            if done == BREAK_AT_STEP:
                raise RuntimeError(f"boom at step {done} while reading {SECRET_IN_ERROR}")

        return super().generate(params, replace(hooks, on_progress=on_progress))


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient[Litestar]]:
    settings = Settings(model="fake", warmup=False, request_timeout=REQUEST_TIMEOUT)
    app = create_app(settings, engine=MidRunFailureEngine(step_seconds=0.02))
    with ready_client(app) as client:
        yield client


def stream(
    client: TestClient[Litestar], body: dict[str, object], request_id: str
) -> list[tuple[str, dict[str, object]]]:
    headers = {**STREAM, "X-Request-ID": request_id}
    with client.stream("POST", "/generate", json=body, headers=headers) as response:
        # The answer had begun: from here on a failure can only travel as an event.
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return read_events(response)


def test_a_failure_mid_stream_ends_it_with_an_error_event(
    client: TestClient[Litestar],
) -> None:
    with capture_logs() as logs:
        events = stream(client, {**BODY, "prompt": "breaks mid-run"}, "mid-run-1")
    assert events == [
        ("progress", {"step": 1, "total": 4}),
        ("progress", {"step": 2, "total": 4}),
        # The generic text, never the exception's (which names a path on the host).
        (
            "error",
            {"detail": "internal error while generating the image", "request_id": "mid-run-1"},
        ),
    ]
    failure = next(log for log in logs if log["event"] == "request_failed_mid_stream")
    assert failure["status"] == 500


def test_a_deadline_mid_stream_ends_it_with_an_error_event_that_says_so(
    client: TestClient[Litestar],
) -> None:
    # 100 steps of 0.02 s cannot finish within the 1 s request timeout.
    events = stream(client, {**BODY, "num_inference_steps": 100}, "too-slow-1")
    *progress, last = events
    assert progress
    assert {name for name, _ in progress} == {"progress"}
    assert last == (
        "error",
        {"detail": "the request deadline passed during generation", "request_id": "too-slow-1"},
    )


def test_the_service_still_streams_after_a_failed_stream(client: TestClient[Litestar]) -> None:
    stream(client, {**BODY, "prompt": "breaks again"}, "mid-run-2")
    events = stream(client, BODY, "after-1")
    assert [name for name, _ in events] == ["progress"] * 4 + ["image"]
    assert events[-1][1]["seed"] == 5
