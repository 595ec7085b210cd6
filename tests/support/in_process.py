"""The app in this process, through Litestar's `TestClient`: started, and read until ready."""

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from litestar import Litestar
from litestar.testing import TestClient

WAIT = 10.0  # a fake engine loads in milliseconds; this bounds a test that would hang


def wait_for_health(
    client: TestClient[Litestar], predicate: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """The first `/health` body that `predicate` accepts."""
    deadline = time.monotonic() + WAIT
    while True:
        body: dict[str, Any] = client.get("/health").json()
        if predicate(body):
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.01)


@contextmanager
def ready_client(app: Litestar) -> Iterator[TestClient[Litestar]]:
    """A client of `app` once its model has loaded (`/health` says ok)."""
    with TestClient(app) as client:
        wait_for_health(client, lambda body: body["status"] == "ok")
        yield client
