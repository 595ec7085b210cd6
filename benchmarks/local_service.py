"""`ovis-service` started by a benchmark: its own process on a free loopback port, with only
the settings the benchmark chooses (no inherited `OVIS_*`, an empty working directory so that no
`.env` applies and the job store starts empty), stopped with SIGTERM as `docker stop` does."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

READY_TIMEOUT_S = 600  # a full-size model loads for minutes; the tiny one in seconds


@contextmanager
def running_service(
    settings: Mapping[str, str], stop_timeout_s: float = 60
) -> Iterator[httpx.Client]:
    """A client of the started service, once `/health` says it is ready."""
    port = _free_port()
    environ = {key: value for key, value in os.environ.items() if not key.startswith("OVIS_")}
    environ.update(settings)
    environ.setdefault("HF_HUB_OFFLINE", "1")
    command = [sys.executable, "-m", "ovis_service", "--host", "127.0.0.1", "--port", str(port)]
    with tempfile.TemporaryDirectory() as directory:
        log_path = Path(directory) / "service.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(command, cwd=directory, env=environ, stdout=log, stderr=log)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
                _wait_until_ready(client, process, log_path)
                yield client
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=stop_timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_until_ready(
    client: httpx.Client, process: subprocess.Popen[bytes], log_path: Path
) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ovis-service exited early:\n{log_path.read_text()[-3000:]}")
        try:
            if client.get("/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.2)
    raise TimeoutError(f"ovis-service not ready after {READY_TIMEOUT_S} s")
