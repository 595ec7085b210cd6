"""Opening the store's database: SQLite in OVIS_DATA_DIR unless OVIS_DATABASE_URL names a
PostgreSQL server shared by replicas."""

import fcntl
import tempfile
from pathlib import Path
from typing import IO

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError

from ovis_service.config import Settings, SettingsError
from ovis_service.store.tables import metadata

SQLITE_FILE = "jobs.sqlite3"
LOCK_FILE = ".lock"
# How long a SQLite writer waits for another (the event loop and the runner share the file).
_SQLITE_BUSY_SECONDS = 30


def open_database(settings: Settings) -> Engine:
    """Connect, create the tables if they are missing, and return the engine. An unusable data
    directory or database is a `SettingsError` naming the setting, so startup refuses it."""
    if settings.database_url:
        engine = create_engine(
            postgres_url(settings.database_url), pool_pre_ping=True, pool_size=10
        )
        setting = "OVIS_DATABASE_URL"
    else:
        path = writable_data_dir(settings.data_dir) / SQLITE_FILE
        engine = create_engine(
            URL.create("sqlite", database=str(path)),
            connect_args={"timeout": _SQLITE_BUSY_SECONDS, "check_same_thread": False},
            # One connection, shared in turn: SQLite runs one writer at a time anyway, and a
            # fixed connection keeps the process's open files fixed (no pool that grows
            # whenever two store calls happen to overlap).
            pool_size=1,
            max_overflow=0,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        setting = "OVIS_DATA_DIR"
    try:
        with engine.begin() as conn:
            if is_postgres(engine):
                # Replicas that start together would race to create the same tables.
                conn.execute(text("SELECT pg_advisory_xact_lock(4201)"))
            metadata.create_all(conn)
    except SQLAlchemyError as exc:
        engine.dispose()
        reason = str(exc.orig if hasattr(exc, "orig") and exc.orig else exc).splitlines()[0]
        raise SettingsError(f"{setting}: the job store cannot be opened: {reason}") from None
    return engine


def hold_data_dir(settings: Settings) -> IO[bytes] | None:
    """Take the SQLite data directory for this process, or refuse: a second service on the same
    directory would put the first one's running jobs back in the queue at its start and run
    them twice. Held until the process ends (the file stays open). None with PostgreSQL, which
    replicas share by design."""
    if settings.database_url:
        return None
    path = writable_data_dir(settings.data_dir) / LOCK_FILE
    handle = path.open("ab")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise SettingsError(
            f"OVIS_DATA_DIR: another ovis-service process already uses {str(path.parent)!r}; "
            "its SQLite job store belongs to one process. Give this one its own OVIS_DATA_DIR, "
            "or let both share OVIS_DATABASE_URL (PostgreSQL)"
        ) from None
    return handle


def postgres_url(url: str) -> URL:
    """`postgresql://` and `postgres://` as operators write them, with the psycopg 3 driver."""
    parsed = make_url(url.replace("postgres://", "postgresql://", 1))
    return parsed.set(drivername="postgresql+psycopg")


def writable_data_dir(data_dir: str) -> Path:
    """Create the directory if needed and prove it takes a file, or refuse with the reason."""
    path = Path(data_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise SettingsError(
            f"OVIS_DATA_DIR: {str(path)!r} is not a writable directory "
            f"({exc.strerror or exc}); the job store keeps its database there"
        ) from None
    return path


def _sqlite_pragmas(connection: object, _record: object) -> None:
    cursor = connection.cursor()  # type: ignore[attr-defined]
    # WAL lets readers (polls, image downloads) go on while the runner writes.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def describe(engine: Engine) -> str:
    """The database for the startup log, without a password."""
    if is_postgres(engine):
        return engine.url.render_as_string(hide_password=True)
    return f"sqlite:{engine.url.database or ''}"
