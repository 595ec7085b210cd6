"""Run the README's quick start as written, against the tiny model, and time it.

The blocks it runs are the fenced `sh` blocks right after the `<!-- quickstart: serve -->` and
`<!-- quickstart: client -->` markers. The serve block starts in the repository root, as a
newcomer runs it; once `/health` says the model is loaded, the client block runs in a scratch
directory, where the image it writes must be a 256x256 PNG. Then the service gets SIGTERM and
must exit 0. Any failure exits non-zero, so CI catches a README that no longer works.

    uv run python scripts/readme_quickstart.py
"""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
BASH = "/bin/bash"  # the shell the README's `sh` blocks are written for
HEALTH_URL = "http://localhost:4201/health"  # the port the README's commands use
READY_TIMEOUT = 600.0  # the first `uv run` may still be building the environment
CLIENT_TIMEOUT = 120.0
IMAGE_FILE = "fox.png"
IMAGE_SIZE = (256, 256)


def quickstart_block(readme: str, name: str) -> str:
    """The fenced sh block that follows `<!-- quickstart: NAME -->`."""
    match = re.search(rf"<!-- quickstart: {name} -->\s*```sh\n(.*?)```", readme, re.DOTALL)
    if match is None:
        raise SystemExit(f"README.md has no ```sh block after <!-- quickstart: {name} -->")
    return match.group(1)


def health() -> dict[str, object] | None:
    try:
        with urllib.request.urlopen(HEALTH_URL, timeout=5) as response:
            body: dict[str, object] = json.load(response)
            return body
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None  # not listening yet, or 503 while loading


def port_in_use() -> bool:
    try:
        urllib.request.urlopen(HEALTH_URL, timeout=2)
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False
    return True


def wait_until_ready(service: subprocess.Popen[bytes], log: Path) -> float:
    started = time.monotonic()
    while time.monotonic() - started < READY_TIMEOUT:
        if service.poll() is not None:
            fail(f"the service exited with {service.returncode} before it was ready", log)
        body = health()
        if body is not None and body.get("status") == "ok":
            return time.monotonic() - started
        time.sleep(0.25)
    fail(f"not ready after {READY_TIMEOUT:.0f} s", log)
    raise AssertionError  # fail() does not return


def fail(message: str, log: Path) -> None:
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
    raise SystemExit(f"readme-quickstart: {message}\n--- service log (last lines) ---\n{tail}")


def run_client(block: str, workdir: Path, log: Path) -> float:
    started = time.monotonic()
    result = subprocess.run(
        [BASH, "-euo", "pipefail", "-c", block],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
        check=False,
    )
    seconds = time.monotonic() - started
    if result.returncode != 0:
        fail(f"the client block exited {result.returncode}: {result.stderr.strip()}", log)
    if '"status":"ok"' not in result.stdout.replace(" ", ""):
        fail(f"the health check did not say ok: {result.stdout[:300]}", log)
    if "HTTP/1.1 200" not in result.stdout:
        fail(f"/generate did not answer 200: {result.stdout[-600:]}", log)
    with Image.open(workdir / IMAGE_FILE) as image:
        image.load()  # decodes every pixel: a truncated file fails here
        if (image.format, image.size) != ("PNG", IMAGE_SIZE):
            fail(
                f"{IMAGE_FILE} is a {image.format} of {image.size}, not a PNG of {IMAGE_SIZE}", log
            )
    return seconds


def main() -> int:
    readme = README.read_text(encoding="utf-8")
    serve, client = quickstart_block(readme, "serve"), quickstart_block(readme, "client")
    if port_in_use():
        raise SystemExit("readme-quickstart: port 4201 is already in use; stop that service first")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env = {key: value for key, value in env.items() if not key.startswith("OVIS_")}
    with tempfile.TemporaryDirectory(prefix="readme-quickstart-") as scratch:
        workdir = Path(scratch)
        log = workdir / "service.log"
        started = time.monotonic()
        with log.open("wb") as log_file:
            service = subprocess.Popen(
                [BASH, "-c", serve],
                cwd=REPO_ROOT,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, so nothing is left behind
            )
        try:
            ready_seconds = wait_until_ready(service, log)
            client_seconds = run_client(client, workdir, log)
            # As `docker stop` or Ctrl-C would: uv passes the signal on to the service.
            service.send_signal(signal.SIGTERM)
            code = service.wait(timeout=60)
        finally:
            if service.poll() is None:
                os.killpg(service.pid, signal.SIGKILL)
                service.wait(timeout=30)
        if code != 0:
            fail(f"the service exited {code} after SIGTERM, not 0", log)
        total = time.monotonic() - started
    print(
        f"readme-quickstart: ok; ready in {ready_seconds:.1f} s, the client block took "
        f"{client_seconds:.2f} s, {total:.1f} s in all"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
