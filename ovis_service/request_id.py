"""Give every request an id, bind it to the log context and echo it in `X-Request-ID`."""

import re
import uuid
from contextvars import ContextVar

import structlog
from litestar.datastructures import MutableScopeHeaders
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "x-request-id"
# A client's id is echoed into logs and headers, so only short, plain ones are trusted.
_SAFE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

NO_REQUEST_ID = "-"
request_id_var: ContextVar[str] = ContextVar("request_id", default=NO_REQUEST_ID)


def current_request_id() -> str:
    return request_id_var.get()


def request_id_from_headers(client_value: str | None) -> str:
    """The client's own id when it is safe to echo, else a fresh one."""
    if client_value is not None and _SAFE_ID.fullmatch(client_value):
        return client_value
    return uuid.uuid4().hex


def _pick_request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == REQUEST_ID_HEADER.encode():
            return request_id_from_headers(value.decode("latin-1"))
    return request_id_from_headers(None)


class RequestIdMiddleware:
    """Plain ASGI middleware, so the id also reaches 404s, 413s and auth failures."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        request_id = _pick_request_id(scope)
        token = request_id_var.set(request_id)
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableScopeHeaders.from_message(message)
                headers[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            structlog.contextvars.clear_contextvars()
            request_id_var.reset(token)
