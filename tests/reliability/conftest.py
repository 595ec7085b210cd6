"""Fixtures for the reliability suite, and the table of figures printed at the end."""

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.figures import BOOK, REPORT_ENV, FigureBook
from tests.support.service import ServiceProcess

FAULT_COMMAND = [sys.executable, "-m", "tests.reliability.fault_service"]


@pytest.fixture(scope="session")
def figures() -> FigureBook:
    return BOOK


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    table = BOOK.table()
    if not table:
        return
    terminalreporter.section("reliability figures")
    terminalreporter.write_line(table)
    report = os.environ.get(REPORT_ENV)
    if report:
        BOOK.write(Path(report))
        terminalreporter.write_line(f"(also written to {report})")


def assert_still_serving(service: ServiceProcess, body: dict[str, object]) -> None:
    """The process is alive, healthy, and a normal request still gets a PNG."""
    assert service.process.poll() is None, service.raw_log()[-3000:]
    with service.client(timeout=60) as client:
        health = client.get("/health")
        assert health.status_code == 200, health.text
        response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    assert response.content.startswith(b"\x89PNG\r\n\x1a\n")


def wait_until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll `condition` until it holds; fail if it has not within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def log_lines(service: ServiceProcess, event: str, **fields: object) -> list[dict[str, Any]]:
    """The service's JSON log lines for `event` whose fields match."""
    return [
        line
        for line in service.logs()
        if line.get("event") == event and all(line.get(k) == v for k, v in fields.items())
    ]


def wait_for_log(
    service: ServiceProcess, event: str, timeout: float = 30.0, **fields: object
) -> dict[str, Any]:
    """Poll the log until a matching line appears; fail with the log's tail if none does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = log_lines(service, event, **fields)
        if found:
            return found[0]
        time.sleep(0.02)
    raise AssertionError(f"no {event} {fields} in {timeout}s:\n{service.raw_log()[-3000:]}")
