"""Error answers that teach: the 413 names the limit in bytes, on both API surfaces."""

from collections.abc import Iterator

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from ovis_service.app import create_app
from ovis_service.config import Settings
from tests.support.fakes import FakeEngine

LIMIT = 2048


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient[Litestar]]:
    settings = Settings(model="fake", warmup=False, max_body_bytes=LIMIT)
    with TestClient(create_app(settings, engine=FakeEngine())) as client:
        yield client


def oversized() -> bytes:
    return b'{"prompt": "' + b"a" * LIMIT + b'"}'


def test_a_body_over_the_limit_is_told_the_limit(client: TestClient[Litestar]) -> None:
    response = client.post(
        "/generate", content=oversized(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json()["detail"] == (
        f"the request body is larger than the limit of {LIMIT} bytes (OVIS_MAX_BODY_BYTES)"
    )


def test_the_openai_surface_names_the_limit_too(client: TestClient[Litestar]) -> None:
    response = client.post(
        "/v1/images/generations",
        content=oversized(),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 413
    assert f"limit of {LIMIT} bytes" in response.json()["error"]["message"]
