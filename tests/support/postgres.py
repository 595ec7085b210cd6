"""A real PostgreSQL server for tests, from Debian's `postgresql` package.

`running_postgres(directory)` runs `initdb` and `postgres` on a free loopback port and stops the
server on exit; the session fixture `postgres_server` shares one server with every test that
imports it (`from tests.support.postgres import postgres_server  # noqa: F401`). Tests that want
a clean slate take a database of their own with `create_database(name)`.

Under CI (`CI` set) missing server binaries fail the run; elsewhere the tests are skipped with
the command that installs them.
"""

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.support.service import free_port

PACKAGE_ROOT = Path("/usr/lib/postgresql")
SUPERUSER = "postgres"
DEFAULT_DATABASE = "ovis"
# Durability buys nothing in a throwaway cluster and costs seconds on a busy disk.
SPEED_SETTINGS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
# A Unix socket path is at most 107 bytes; "/.s.PGSQL.NNNNN" takes 15 of them.
MAX_SOCKET_DIR_LEN = 90
DATABASE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def find_postgres_bin() -> Path | None:
    """The newest `/usr/lib/postgresql/<version>/bin` that holds a server, if any."""
    candidates = [
        path.parent
        for path in PACKAGE_ROOT.glob("*/bin/postgres")
        if path.parent.parent.name.isdigit() and (path.parent / "initdb").exists()
    ]
    if not candidates:
        return None
    return max(candidates, key=lambda bin_dir: int(bin_dir.parent.name))


def require_postgres_bin() -> Path:
    bin_dir = find_postgres_bin()
    if bin_dir is None:
        message = (
            f"PostgreSQL server binaries are missing ({PACKAGE_ROOT}/<version>/bin/postgres): "
            "apt-get install --no-install-recommends postgresql"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return bin_dir


@dataclass
class PostgresServer:
    host: str
    port: int
    user: str
    database: str
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    @property
    def plain_url(self) -> str:
        return self.plain_url_for(self.database)

    @property
    def url(self) -> str:
        """The SQLAlchemy form, for the psycopg 3 driver."""
        return self.url_for(self.database)

    def plain_url_for(self, database: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{database}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def create_database(self, name: str) -> str:
        """Create an empty database and return its SQLAlchemy URL."""
        if not DATABASE_NAME.fullmatch(name):
            raise ValueError(f"database name {name!r} must match {DATABASE_NAME.pattern}")
        with psycopg.connect(self.plain_url_for("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)


def _server_user() -> str | None:
    """The user to run initdb and postgres as: they refuse root, so root hands them to `postgres`.

    Popen switches user itself rather than through `runuser`, so that the process it holds is the
    postmaster and the fast-shutdown signal reaches it, not a wrapper with signal rules of its own.
    """
    return SUPERUSER if os.geteuid() == 0 else None


def _server_env() -> dict[str, str]:
    # A developer's PGDATA, PGPORT or PGHOST must not steer the test cluster.
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}


def _log_tail(log_path: Path, lines: int = 40) -> str:
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return "(no server log)"
    return "\n".join(text.splitlines()[-lines:])


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Fast shutdown (SIGINT: roll back and disconnect clients), then SIGKILL if it hangs."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT_S)


def _wait_until_ready(server: PostgresServer, deadline: float) -> None:
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"postgres exited with code {server.process.returncode} before accepting "
                f"connections; server log:\n{_log_tail(server.log_path)}"
            )
        try:
            with psycopg.connect(server.plain_url_for("postgres"), connect_timeout=2):
                return
        except psycopg.OperationalError as error:
            last_error = error
        time.sleep(0.05)
    raise TimeoutError(
        f"postgres on port {server.port} not accepting connections after {READY_TIMEOUT_S}s "
        f"({last_error}); server log:\n{_log_tail(server.log_path)}"
    )


def _port_taken(log_path: Path) -> bool:
    tail = _log_tail(log_path)
    return "could not bind" in tail or "Address already in use" in tail


@contextmanager
def running_postgres(directory: Path) -> Iterator[PostgresServer]:
    """initdb, start on a free 127.0.0.1 port, create `ovis`, yield; stop on exit.

    The server log is `directory/postgres.log`. As root the cluster itself lives in a directory
    of its own under the system temp dir, owned by `postgres`: pytest's tmp_path sits under a
    0700 directory that user cannot enter.
    """
    bin_dir = require_postgres_bin()
    directory.mkdir(parents=True, exist_ok=True)
    user = _server_user()
    # Dropping root also drops root's supplementary groups.
    as_user: dict[str, Any] = {"user": user, "group": user, "extra_groups": []} if user else {}
    own_base: Path | None = None
    if user or len(str(directory / "socket")) > MAX_SOCKET_DIR_LEN:
        own_base = Path(tempfile.mkdtemp(prefix="ovis-pg-"))
        own_base.chmod(0o755)
    base = own_base or directory
    data_dir = base / "data"
    socket_dir = base / "socket"
    socket_dir.mkdir(mode=0o700)
    if user:
        for path in (base, socket_dir):
            shutil.chown(path, user, user)
    log_path = directory / "postgres.log"
    env = _server_env()
    try:
        init = subprocess.run(
            [
                str(bin_dir / "initdb"),
                f"--pgdata={data_dir}",
                f"--username={SUPERUSER}",
                "--auth-local=trust",
                "--auth-host=trust",
                "--encoding=UTF8",
                # C needs no generated locale on the machine and compares bytes: fast and stable.
                "--locale=C",
                "--no-sync",
            ],
            cwd=base,
            env=env,
            capture_output=True,
            text=True,
            check=False,
            **as_user,
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed ({init.returncode}):\n{init.stdout}{init.stderr}")
        deadline = time.monotonic() + READY_TIMEOUT_S
        # Another process may take the free port before postgres binds it; then try a fresh one.
        for attempt in range(3):
            port = free_port()
            with log_path.open("ab") as log_file:
                process = subprocess.Popen(
                    [
                        str(bin_dir / "postgres"),
                        *("-D", str(data_dir), "-k", str(socket_dir), "-p", str(port)),
                        *("-c", "listen_addresses=127.0.0.1"),
                        *(arg for setting in SPEED_SETTINGS for arg in ("-c", setting)),
                    ],
                    cwd=base,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    **as_user,
                )
            server = PostgresServer(
                host="127.0.0.1",
                port=port,
                user=SUPERUSER,
                database=DEFAULT_DATABASE,
                data_dir=data_dir,
                log_path=log_path,
                process=process,
            )
            try:
                _wait_until_ready(server, deadline)
            except RuntimeError:
                if attempt < 2 and _port_taken(log_path):
                    continue
                raise
            except BaseException:
                _stop(process)
                raise
            break
        try:
            server.create_database(DEFAULT_DATABASE)
            yield server
        finally:
            _stop(server.process)
    finally:
        if own_base is not None:
            shutil.rmtree(own_base, ignore_errors=True)


# The explicit name keeps the fixture `postgres_server` when a test module imports it as an alias.
@pytest.fixture(scope="session", name="postgres_server")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole test session."""
    with running_postgres(tmp_path_factory.mktemp("postgres")) as server:
        yield server
