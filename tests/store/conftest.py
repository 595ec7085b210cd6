"""Every job store test runs twice: on SQLite in a data dir of its own, and on a fresh
PostgreSQL database from the session's shared server. Time comes from a fake clock, so expiry and
leases are tested without sleeping."""

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ovis_service.config import Settings
from ovis_service.store.database import open_database
from ovis_service.store.job_store import JobStore

# Registered for `getfixturevalue`; only the postgres half of each test starts the server.
from tests.support.postgres import PostgresServer
from tests.support.postgres import postgres_server as postgres_server_fixture  # noqa: F401

TTL = 3600.0


@dataclass
class FakeClock:
    """Unix seconds that move only when a test says so."""

    now: float = 1_700_000_000.25

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["sqlite", "postgres"])
def store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Settings that point at an empty database of this test's own."""
    if request.param == "sqlite":
        return Settings(data_dir=str(tmp_path / "data"))
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return Settings(database_url=server.create_database(f"store_{uuid.uuid4().hex}"))


@pytest.fixture
def open_store(store_settings: Settings, clock: FakeClock) -> Iterator[Callable[[], JobStore]]:
    """Opens another store on the same database, with an engine of its own: a second replica."""
    opened: list[JobStore] = []

    def open_one() -> JobStore:
        store = JobStore(open_database(store_settings), ttl=TTL, clock=clock)
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: Callable[[], JobStore]) -> JobStore:
    return open_store()
