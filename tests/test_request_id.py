"""Request ids (`ovis_service.request_id`): the client's own when it is short and plain, a fresh
one otherwise; echoed in `X-Request-ID` and error bodies on every answer, routed or not, and
bound to the log context for exactly the request's lifetime."""

import asyncio
import re
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from litestar import Litestar
from litestar.testing import TestClient

from ovis_service.app import create_app
from ovis_service.config import Settings
from ovis_service.request_id import (
    NO_REQUEST_ID,
    RequestIdMiddleware,
    current_request_id,
    request_id_from_headers,
)
from tests.support.fakes import FakeEngine
from tests.support.in_process import ready_client

FRESH_ID = re.compile(r"[0-9a-f]{32}")
KEY = "k1"


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient[Litestar]]:
    """A keyed app with a small body limit, so that 401 and 413 answers can be asked for too."""
    settings = Settings(model="fake", warmup=False, api_keys=(KEY,), max_body_bytes=1024)
    with ready_client(create_app(settings, engine=FakeEngine())) as client:
        yield client


@pytest.mark.parametrize(
    ("sent", "echoed"),
    [("client-id_1.2:3", True), ("x" * 129, False), ("has space", False), ("<script>", False)],
)
def test_only_plain_request_ids_are_echoed(
    client: TestClient[Litestar], sent: str, echoed: bool
) -> None:
    response = client.get("/health", headers={"X-Request-ID": sent})
    assert (response.headers["x-request-id"] == sent) is echoed
    assert len(response.headers["x-request-id"]) <= 128


def test_without_an_id_each_request_gets_a_fresh_one(client: TestClient[Litestar]) -> None:
    ids = [client.get("/health").headers["x-request-id"] for _ in range(3)]
    assert all(FRESH_ID.fullmatch(request_id) for request_id in ids), ids
    assert len(set(ids)) == 3


def test_unrouted_requests_also_get_a_request_id(client: TestClient[Litestar]) -> None:
    response = client.get("/nowhere")
    assert response.status_code == 404
    assert response.json()["request_id"] == response.headers["x-request-id"]
    wrong_method = client.get("/generate")
    assert wrong_method.status_code == 405
    assert wrong_method.json()["request_id"] == wrong_method.headers["x-request-id"]


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        ({}, b"{}", 401),  # refused by the key guard, before any handler
        ({"Authorization": f"Bearer {KEY}"}, b"x" * 2048, 413),  # refused while reading the body
    ],
    ids=["auth failure", "body too large"],
)
def test_answers_refused_before_a_handler_carry_the_clients_id(
    client: TestClient[Litestar], headers: dict[str, str], body: bytes, status: int
) -> None:
    response = client.post(
        "/generate",
        content=body,
        headers={**headers, "Content-Type": "application/json", "X-Request-ID": "trace-42"},
    )
    assert response.status_code == status
    assert response.headers["x-request-id"] == "trace-42"
    assert response.json()["request_id"] == "trace-42"


def test_request_id_from_headers_keeps_a_safe_id_and_replaces_anything_else() -> None:
    assert request_id_from_headers("abc-DEF_1.2:3") == "abc-DEF_1.2:3"
    for unsafe in (None, "", "x" * 129, "new\nline", "caf\u00e9", "a/b"):
        assert FRESH_ID.fullmatch(request_id_from_headers(unsafe)), unsafe


def test_the_id_is_in_the_log_context_for_the_request_and_gone_after_it() -> None:
    # Plain ASGI, typed loosely: the messages are dicts as the server would send them.
    seen: dict[str, Any] = {}
    sent: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen["current"] = current_request_id()
        seen["context"] = structlog.contextvars.get_contextvars()
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    async def one_request() -> tuple[str, dict[str, Any]]:
        # Left over from an earlier request on this task: must not leak into this one.
        structlog.contextvars.bind_contextvars(request_id="stale", prompt_chars=3)
        scope: Any = {"type": "http", "headers": [(b"x-request-id", b"trace-7")]}
        await RequestIdMiddleware(app)(scope, receive, send)
        return current_request_id(), structlog.contextvars.get_contextvars()

    after, context_after = asyncio.run(one_request())
    assert seen == {"current": "trace-7", "context": {"request_id": "trace-7"}}
    assert (b"x-request-id", b"trace-7") in sent[0]["headers"]
    assert (after, context_after) == (NO_REQUEST_ID, {})


def test_lifespan_messages_pass_through_without_an_id() -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(current_request_id())

    async def nothing() -> Any:
        raise AssertionError("not called")

    async def ignore(_message: Any) -> None:
        return None

    scope: Any = {"type": "lifespan"}
    asyncio.run(RequestIdMiddleware(app)(scope, nothing, ignore))
    assert seen == [NO_REQUEST_ID]
