"""Fixtures for the reliability suite, and the table of figures printed at the end."""

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
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


@pytest.fixture
def http() -> Iterator[type[httpx.Client]]:
    yield httpx.Client
