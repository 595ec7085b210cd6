"""Opening the store's database: the data dir is created or refused with the setting's name, a
PostgreSQL URL is accepted as operators write it and never logged with its password, and SQLite
runs in WAL mode so that reads go on while the runner writes."""

from pathlib import Path

import pytest
from sqlalchemy import create_engine

from ovis_service.config import Settings, SettingsError
from ovis_service.store.database import (
    SQLITE_FILE,
    describe,
    hold_data_dir,
    open_database,
    postgres_url,
    writable_data_dir,
)
from tests.support.service import free_port

PASSWORD = "hunter2-not-for-logs"


def test_a_missing_data_dir_is_created(tmp_path: Path) -> None:
    wanted = tmp_path / "state" / "ovis"
    assert writable_data_dir(str(wanted)) == wanted
    assert wanted.is_dir()


@pytest.mark.parametrize(
    ("below_file", "reason"), [(True, "Not a directory"), (False, "File exists")]
)
def test_a_data_dir_that_cannot_be_a_directory_is_refused(
    tmp_path: Path, below_file: bool, reason: str
) -> None:
    # Root ignores permission bits, so the refusal is provoked with a regular file instead.
    regular = tmp_path / "a-file"
    regular.write_text("not a directory")
    data_dir = regular / "data" if below_file else regular

    with pytest.raises(SettingsError, match="OVIS_DATA_DIR") as refused:
        writable_data_dir(str(data_dir))
    assert reason in str(refused.value)
    assert str(data_dir) in str(refused.value)
    # Startup refuses it the same way.
    with pytest.raises(SettingsError, match="OVIS_DATA_DIR"):
        open_database(Settings(data_dir=str(data_dir)))


def test_an_unreachable_postgres_is_refused_without_its_password() -> None:
    port = free_port()  # nothing listens there
    url = f"postgresql://ovis:{PASSWORD}@127.0.0.1:{port}/ovis"
    with pytest.raises(SettingsError, match="OVIS_DATABASE_URL") as refused:
        open_database(Settings(database_url=url))
    message = str(refused.value)
    assert str(port) in message
    assert PASSWORD not in message


@pytest.mark.parametrize("scheme", ["postgres", "postgresql", "postgresql+psycopg"])
def test_postgres_urls_as_operators_write_them_use_psycopg(scheme: str) -> None:
    url = postgres_url(f"{scheme}://ovis:{PASSWORD}@db.internal:5433/jobs")
    assert url.drivername == "postgresql+psycopg"
    assert (url.username, url.password, url.host, url.port, url.database) == (
        "ovis",
        PASSWORD,
        "db.internal",
        5433,
        "jobs",
    )


def test_describe_hides_the_postgres_password() -> None:
    engine = create_engine(postgres_url(f"postgres://ovis:{PASSWORD}@db.internal/jobs"))
    try:
        described = describe(engine)
    finally:
        engine.dispose()
    assert PASSWORD not in described
    assert "db.internal" in described
    assert "jobs" in described


def test_sqlite_lives_in_the_data_dir_in_wal_mode(tmp_path: Path) -> None:
    engine = open_database(Settings(data_dir=str(tmp_path / "data")))
    try:
        assert describe(engine) == f"sqlite:{tmp_path / 'data' / SQLITE_FILE}"
        assert (tmp_path / "data" / SQLITE_FILE).is_file()
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        engine.dispose()


def test_one_process_holds_a_sqlite_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=str(tmp_path / "data"))
    held = hold_data_dir(settings)
    assert held is not None
    try:
        with pytest.raises(SettingsError, match="another ovis-service process") as refused:
            hold_data_dir(settings)
        assert str(refused.value).startswith("OVIS_DATA_DIR: ")
    finally:
        held.close()
    hold_data_dir(settings).close()  # free again once the holder lets go
    # PostgreSQL is shared by replicas on purpose: nothing to hold.
    assert hold_data_dir(Settings(database_url="postgresql://ovis@127.0.0.1/ovis")) is None
