"""Fixtures for the pool and thread tests: a fast fake engine and a started pool over it."""

from collections.abc import Iterator

import pytest

from ovis_service.worker.pool import InferencePool
from tests.support.fakes import FakeEngine
from tests.support.worker import running_pool


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(step_seconds=0.001)


@pytest.fixture
def worker(engine: FakeEngine) -> Iterator[InferencePool]:
    with running_pool(engine, capacity=2) as worker:
        yield worker
