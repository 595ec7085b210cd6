"""The PostgreSQL test server starts, serves SQLAlchemy and psycopg, and stops; and row locks
with SKIP LOCKED behave as the job store needs: two workers never claim the same job."""

import socket
from pathlib import Path

import psycopg
import pytest
import sqlalchemy

from tests.support.postgres import PostgresServer, running_postgres

# Under another name so that the tests' `postgres_server` argument does not shadow the import;
# pytest registers the fixture under its declared name all the same.
from tests.support.postgres import postgres_server as postgres_server_fixture  # noqa: F401

CLAIM = "SELECT id FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED"


def test_sqlalchemy_url_reaches_the_server(postgres_server: PostgresServer) -> None:
    assert postgres_server.url.startswith("postgresql+psycopg://")
    assert postgres_server.plain_url.startswith("postgresql://")
    engine = sqlalchemy.create_engine(postgres_server.url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sqlalchemy.text("SELECT current_database()")).scalar_one() == (
                postgres_server.database
            )
            encoding = conn.execute(sqlalchemy.text("SHOW server_encoding")).scalar_one()
            assert encoding == "UTF8"
    finally:
        engine.dispose()


def test_skip_locked_hands_each_job_to_one_worker(postgres_server: PostgresServer) -> None:
    url = postgres_server.create_database("skip_locked")
    plain = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as setup:
        setup.execute("CREATE TABLE jobs (id integer PRIMARY KEY, state text NOT NULL)")
        setup.execute("INSERT INTO jobs VALUES (1, 'queued'), (2, 'queued')")

    with psycopg.connect(plain) as first, psycopg.connect(plain) as second:
        # Each connection is in its own transaction until commit: the first one's lock holds.
        claimed_first = first.execute(CLAIM).fetchone()
        assert claimed_first == (1,)
        assert second.execute(CLAIM).fetchone() == (2,)
        # The first worker's row really is locked, not merely skipped by chance.
        with pytest.raises(psycopg.errors.LockNotAvailable):
            second.execute("SELECT id FROM jobs WHERE id = 1 FOR UPDATE NOWAIT")
        second.rollback()
        # Both rows locked: a third claim finds nothing rather than waiting.
        second.execute("SELECT id FROM jobs WHERE id = 2 FOR UPDATE")
        with psycopg.connect(plain) as third:
            assert third.execute(CLAIM).fetchone() is None
            first.execute("UPDATE jobs SET state = 'running' WHERE id = 1")
            first.commit()
            third.rollback()
            # Row 1 is no longer queued and row 2 is still held: still nothing to claim.
            assert third.execute(CLAIM).fetchone() is None
            second.rollback()
            third.rollback()
            assert third.execute(CLAIM).fetchone() == (2,)


def test_create_database_gives_an_empty_database(postgres_server: PostgresServer) -> None:
    url = postgres_server.create_database("fresh_one")
    assert url == postgres_server.url_for("fresh_one")
    with psycopg.connect(postgres_server.plain_url_for("fresh_one")) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchone()
        assert tables == (0,)
    with pytest.raises(ValueError, match="database name"):
        postgres_server.create_database('bad"name')


def test_server_stops_on_exit(tmp_path: Path) -> None:
    with running_postgres(tmp_path) as server:
        with psycopg.connect(server.plain_url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        port = server.port
    assert server.process.returncode is not None
    assert "database system is shut down" in server.log()
    if not server.data_dir.is_relative_to(tmp_path):
        # The cluster had a directory of its own (as root): it is gone with the server.
        assert not server.data_dir.exists()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0
