"""The exception handler: it answers with what each error carries (status, headers, OpenAI's
`code`), in the native shape or OpenAI's under /v1, and a 413 names the limit in bytes."""

from collections.abc import Iterator
from typing import ClassVar

import pytest
from litestar import Litestar, get
from litestar.testing import TestClient

from ovis_service.api.errors import handle_exception, openai_error_body
from ovis_service.app import create_app
from ovis_service.config import Settings
from ovis_service.errors import OutOfMemoryError, OverloadedError, ServiceError, UnauthorizedError
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


def test_out_of_memory_is_an_overload_told_apart_by_its_class_not_its_words() -> None:
    error = OutOfMemoryError("the queue is full", retry_after=3)  # misleading text on purpose
    assert isinstance(error, OverloadedError)
    assert openai_error_body(error)["error"]["code"] == "out_of_memory"
    assert openai_error_body(OverloadedError("out of memory"))["error"]["code"] == "queue_full"


class _TeapotError(ServiceError):
    """An error the handler has never heard of: it must still answer as the class says."""

    status_code = 418
    openai_code = "teapot"
    headers: ClassVar = {"X-Brew": "earl grey"}


@get("/brew")
async def brew() -> None:
    raise _TeapotError("short and stout", retry_after=7, param="kettle")


@get("/v1/brew")
async def brew_openai() -> None:
    raise _TeapotError("short and stout", param="kettle")


def test_the_handler_answers_with_what_the_error_carries() -> None:
    app = Litestar([brew, brew_openai], exception_handlers={Exception: handle_exception})
    with TestClient(app) as client:
        native = client.get("/brew")
        openai = client.get("/v1/brew")
    assert native.status_code == 418
    assert native.json()["detail"] == "short and stout"
    assert (native.headers["x-brew"], native.headers["retry-after"]) == ("earl grey", "7")
    assert openai.status_code == 418
    assert openai.json()["error"] == {
        "message": "short and stout",
        "type": "invalid_request_error",
        "param": "kettle",
        "code": "teapot",
    }


def test_a_401_asks_for_a_bearer_token() -> None:
    @get("/secret")
    async def secret() -> None:
        raise UnauthorizedError("missing key")

    app = Litestar([secret], exception_handlers={Exception: handle_exception})
    with TestClient(app) as client:
        response = client.get("/secret")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
