"""Start the service as a real process on a free loopback port, and talk to it over HTTP."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_COMMAND = [sys.executable, "-m", "ovis_service"]
FAKE_COMMAND = [sys.executable, "-m", "tests.support.fake_service"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ServiceProcess:
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=kwargs.pop("timeout", 60.0), **kwargs)

    def logs(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far (anything else on stdout is ignored)."""
        lines = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
        return lines

    def raw_log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, as `docker stop` sends, then wait for the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


def wait_until_ready(base_url: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=base_url, timeout=2.0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"service exited early with code {process.returncode}")
            try:
                if client.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"service at {base_url} not ready after {timeout}s")


@contextmanager
def run_service(
    tmp_path: Path,
    *,
    env: dict[str, str] | None = None,
    command: list[str] | None = None,
    wait_ready: bool = True,
    ready_timeout: float = 120.0,
) -> Iterator[ServiceProcess]:
    port = free_port()
    full_env = {key: value for key, value in os.environ.items() if not key.startswith("OVIS_")}
    full_env.update(
        {
            "OVIS_MODEL": "tiny",
            "OVIS_HOST": "127.0.0.1",
            "OVIS_PORT": str(port),
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            # The service runs in tmp_path, where no developer's `.env` can reach it; this
            # keeps `tests.support` importable from there.
            "PYTHONPATH": str(REPO_ROOT),
        }
    )
    full_env.update(env or {})
    log_path = tmp_path / f"service-{port}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command or TINY_COMMAND,
            cwd=tmp_path,
            env=full_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    service = ServiceProcess(process, f"http://127.0.0.1:{port}", log_path)
    try:
        if wait_ready:
            wait_until_ready(service.base_url, process, ready_timeout)
        yield service
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
