"""Each error carries its own answer: the status, OpenAI's `code` and the reject reason are class
attributes, and the exception handler, the pool and the streams read them, never the message."""

from typing import ClassVar

import pytest
from litestar import Litestar, get
from litestar.testing import TestClient

from ovis_service.api.errors import handle_exception, openai_error_body
from ovis_service.errors import (
    BadRequestError,
    DeadlineExceededError,
    JobCancelledError,
    ModelLoadingError,
    NotReadyError,
    OutOfMemoryError,
    OverloadedError,
    ServiceError,
    ShuttingDownError,
    UnauthorizedError,
)


@pytest.mark.parametrize(
    ("error_class", "status", "code", "reason"),
    [
        (BadRequestError, 422, None, None),
        (UnauthorizedError, 401, "invalid_api_key", None),
        (OverloadedError, 503, "queue_full", "queue_full"),
        (OutOfMemoryError, 503, "out_of_memory", "out_of_memory"),
        (NotReadyError, 503, "model_not_ready", None),
        (ModelLoadingError, 503, "model_not_ready", "loading"),
        (ShuttingDownError, 503, "shutting_down", "shutting_down"),
        (DeadlineExceededError, 504, "timeout", "deadline"),
        (JobCancelledError, 499, None, None),
    ],
)
def test_each_error_knows_its_status_code_and_reason(
    error_class: type[ServiceError], status: int, code: str | None, reason: str | None
) -> None:
    error = error_class("whatever the words")
    assert (error.status_code, error.openai_code, error.reject_reason) == (status, code, reason)


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
