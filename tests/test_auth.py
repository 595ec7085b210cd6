"""The optional API key (`ovis_service.auth`), in process: off without keys, any configured key
accepted, public routes open, and a missing key told apart from a wrong one in the answer and the
log. The same guard against the real server, with near-miss keys, the schema and the body limit,
is in tests/reliability/test_security.py."""

from collections.abc import Iterator

import pytest
from litestar import Litestar
from litestar.testing import TestClient
from structlog.testing import capture_logs

from ovis_service.app import create_app
from ovis_service.config import Settings
from tests.support.fakes import FakeEngine
from tests.support.in_process import ready_client

KEYS = ("first-key", "second-key")
MISSING = "missing API key: send 'Authorization: Bearer <key>'"
INVALID = "invalid API key"


def started(settings: Settings) -> Iterator[TestClient[Litestar]]:
    with ready_client(create_app(settings, engine=FakeEngine())) as client:
        yield client


@pytest.fixture(scope="module")
def keyed() -> Iterator[TestClient[Litestar]]:
    yield from started(Settings(model="fake", warmup=False, api_keys=KEYS))


@pytest.fixture(scope="module")
def open_app() -> Iterator[TestClient[Litestar]]:
    yield from started(Settings(model="fake", warmup=False))


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer ", "Bearer anything", "Basic dTpw"],
    ids=["none", "empty bearer", "any bearer", "basic"],
)
def test_without_keys_every_request_passes_whatever_it_sends(
    open_app: TestClient[Litestar], authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    assert open_app.get("/v1/models", headers=headers).status_code == 200


@pytest.mark.parametrize(
    "authorization",
    ["Bearer first-key", "Bearer second-key", "bearer first-key", "BEARER   second-key"],
)
def test_every_configured_key_opens_every_route(
    keyed: TestClient[Litestar], authorization: str
) -> None:
    headers = {"Authorization": authorization}
    assert keyed.get("/v1/models", headers=headers).status_code == 200
    assert keyed.get("/metrics", headers=headers).status_code == 200


@pytest.mark.parametrize(
    ("authorization", "detail", "reason"),
    [
        (None, MISSING, "missing bearer token"),
        ("Bearer", MISSING, "missing bearer token"),
        ("Basic Zmlyc3Qta2V5", MISSING, "missing bearer token"),
        ("first-key", MISSING, "missing bearer token"),
        ("Bearer second-ke", INVALID, "invalid API key"),
        ("Bearer first-key,second-key", INVALID, "invalid API key"),
    ],
    ids=["no header", "no token", "basic", "no scheme", "a key's prefix", "both keys joined"],
)
def test_a_missing_key_and_a_wrong_key_are_told_apart_in_the_answer_and_the_log(
    keyed: TestClient[Litestar], authorization: str | None, detail: str, reason: str
) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    with capture_logs() as logs:
        response = keyed.get("/metrics", headers=headers)
        openai_shaped = keyed.get("/v1/models", headers=headers)
    assert response.status_code == openai_shaped.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["detail"] == detail
    assert openai_shaped.json()["error"]["message"] == detail
    failures = [log for log in logs if log["event"] == "auth_failed"]
    assert [(log["reason"], log["path"], log["log_level"]) for log in failures] == [
        (reason, "/metrics", "warning"),
        (reason, "/v1/models", "warning"),
    ]
    # What was presented stays out of the log, right or wrong.
    assert not any(key in repr(logs) for key in ("first-key", "second-ke"))


@pytest.mark.parametrize("path", ["/health", "/livez"])
def test_the_probes_need_no_key(keyed: TestClient[Litestar], path: str) -> None:
    assert keyed.get(path).status_code == 200


def test_everything_else_needs_one(keyed: TestClient[Litestar]) -> None:
    for path in ("/v1/models", "/metrics", "/openapi.json"):
        assert keyed.get(path).status_code == 401, path
    assert keyed.post("/generate", json={"prompt": "a fox"}).status_code == 401
