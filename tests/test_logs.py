"""The production log: one JSON object per line on stdout, from structlog and from the standard
library (uvicorn, diffusers) alike, with an ISO UTC timestamp, the level, the request's context
and any traceback inside the line.

`configure_logging` sets process-wide state (structlog's configuration, the root logger's
handlers), so each test configures it inside `json_logging` and gets the defaults back after:
the other tests rely on structlog's defaults for `capture_logs`."""

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import structlog

from ovis_service.logs import configure_logging

LEVELS = ["debug", "info", "warning", "error"]
# The loggers configure_logging changes, besides structlog's own configuration.
TOUCHED_LOGGERS = ["", "uvicorn", "uvicorn.error", "uvicorn.access"]


@contextmanager
def json_logging(level: str) -> Iterator[None]:
    """Production logging for the length of the block, then everything as it was. Used inside
    the test body, so pytest's own per-phase log handlers are what gets restored."""
    saved = [
        (logger, logger.handlers[:], logger.level, logger.propagate)
        for logger in map(logging.getLogger, TOUCHED_LOGGERS)
    ]
    configure_logging(level)
    try:
        yield
    finally:
        structlog.reset_defaults()
        structlog.contextvars.clear_contextvars()
        for logger, handlers, logger_level, propagate in saved:
            logger.handlers = handlers
            logger.setLevel(logger_level)
            logger.propagate = propagate


def json_lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    """Every line written to stdout, each of which must be a JSON object."""
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_an_event_is_one_json_line_with_an_iso_utc_timestamp_and_its_level(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with json_logging("INFO"):
        structlog.get_logger("ovis_service.example").info("job_finished", seconds=1.5)
    [line] = json_lines(capsys)
    assert line.keys() == {"event", "seconds", "level", "logger", "timestamp"}
    assert (line["event"], line["seconds"], line["level"]) == ("job_finished", 1.5, "info")
    assert line["logger"] == "ovis_service.example"
    assert line["timestamp"].endswith("Z")  # UTC, whatever the host's zone
    logged_at = datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00"))
    assert abs(datetime.now(timezone.utc) - logged_at) < timedelta(minutes=1)


def test_the_request_context_joins_every_line_until_it_is_cleared(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with json_logging("INFO"):
        structlog.contextvars.bind_contextvars(request_id="req-9")
        structlog.get_logger("ovis_service.example").info("request_done")
        logging.getLogger("uvicorn.error").warning("slow client")
        structlog.contextvars.clear_contextvars()
        structlog.get_logger("ovis_service.example").info("idle")
    done, slow, idle = json_lines(capsys)
    assert done["request_id"] == "req-9"
    assert slow["request_id"] == "req-9"  # a library's line inside the request carries it too
    assert "request_id" not in idle


def test_a_traceback_stays_inside_its_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    with json_logging("INFO"):
        try:
            raise ValueError("bad shape for transformer.x")
        except ValueError:
            structlog.get_logger("ovis_service.example").exception("job_failed", request_id="r")
    [line] = json_lines(capsys)
    assert (line["event"], line["level"], line["request_id"]) == ("job_failed", "error", "r")
    assert line["exception"].startswith("Traceback (most recent call last):")
    assert line["exception"].endswith("ValueError: bad shape for transformer.x")
    assert "exc_info" not in line


@pytest.mark.parametrize("level", ["DEBUG", "INFO", "WARNING", "ERROR"])
def test_lines_below_the_configured_level_are_dropped_from_both_sources(
    level: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with json_logging(level):
        ours = structlog.get_logger("ovis_service.example")
        # A library that leaves its logger's level alone (diffusers and transformers pin
        # theirs to WARNING once imported, whatever OVIS_LOG_LEVEL says).
        library = logging.getLogger("some_library.example")
        for name in LEVELS:
            getattr(ours, name)(f"ours_{name}")
            getattr(library, name)(f"library_{name}")
    shown = LEVELS[LEVELS.index(level.lower()) :]
    assert [line["event"] for line in json_lines(capsys)] == [
        event for name in shown for event in (f"ours_{name}", f"library_{name}")
    ]


def test_uvicorn_logs_once_as_json_and_its_access_log_is_left_to_ours(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # uvicorn's own config gives its loggers a plain-text handler that does not propagate.
    uvicorn_logger = logging.getLogger("uvicorn")
    saved = (uvicorn_logger.handlers[:], uvicorn_logger.propagate)
    uvicorn_logger.handlers = [logging.StreamHandler()]
    uvicorn_logger.propagate = False
    try:
        with json_logging("INFO"):
            logging.getLogger("uvicorn.error").info("Started server process")
            logging.getLogger("uvicorn.access").info('127.0.0.1 - "GET /health" 200')
            logging.getLogger("uvicorn.access").warning("access log trouble")
    finally:
        uvicorn_logger.handlers, uvicorn_logger.propagate = saved
    started, trouble = json_lines(capsys)
    assert (started["event"], started["logger"]) == ("Started server process", "uvicorn.error")
    assert (trouble["event"], trouble["level"]) == ("access log trouble", "warning")
