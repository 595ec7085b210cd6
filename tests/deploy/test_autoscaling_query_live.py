"""The KEDA query, evaluated for real: Debian's Prometheus scrapes a running service (the real
app and server over a fake engine, with an API key, as deploy/prometheus/scrape-with-key.yaml
does), work goes into the queue and async jobs into the job store behind it, and the exact query
string from the rendered ScaledObject, asked through Prometheus' HTTP API, must count them all."""

import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.deploy.conftest import Manifest, only
from tests.support.service import FAKE_COMMAND, ServiceProcess, free_port, run_service

pytestmark = pytest.mark.timeout(180)

API_KEY = "scrape-key"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
WAIT = 60.0
# A `held` prompt runs until the test creates the hold file: it keeps the one inference thread
# busy, and the requests behind it queued, for as long as the scrapes take.
HELD = {"prompt": "held", "num_inference_steps": 2, "image_size": 256, "seed": 1}
QUICK = {"prompt": "quick", "num_inference_steps": 2, "image_size": 256}
SYNC_REQUESTS, ASYNC_JOBS = 3, 4
BACKLOG = 'max(ovis_pending_jobs{job="ovis-service"})'


@pytest.fixture(scope="module")
def hold_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hold") / "release"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, hold_file: Path) -> Iterator[ServiceProcess]:
    # One inference thread; the job store is SQLite in the service's own directory.
    env = {"FAKE_HOLD_FILE": str(hold_file), "OVIS_API_KEY": API_KEY}
    with run_service(tmp_path_factory.mktemp("svc"), env=env, command=FAKE_COMMAND) as service:
        yield service
        hold_file.touch()  # a failed test must not leave held requests behind


@pytest.fixture(scope="module")
def prometheus(service: ServiceProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Prometheus process on a free loopback port, scraping the service every second."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not on PATH: apt-get install prometheus (.ci/run does)")
    home = tmp_path_factory.mktemp("prometheus")
    key_file = home / "ovis-api-key"
    key_file.write_text(API_KEY + "\n")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "ovis-service",  # the ScaledObject's query selects this job
                "metrics_path": "/metrics",
                "authorization": {"type": "Bearer", "credentials_file": str(key_file)},
                "static_configs": [{"targets": [service.base_url.removeprefix("http://")]}],
            }
        ],
    }
    (home / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (home / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={home / 'prometheus.yml'}",
            f"--storage.tsdb.path={home / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_ready(url, process, home / "prometheus.log")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def _wait_for_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"prometheus not ready after {WAIT}s:\n{log.read_text()}")


def evaluate(prometheus: str, query: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": query}, timeout=10)
    body: dict[str, Any] = response.json()
    assert response.status_code == 200, body
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def wait_for_value(prometheus: str, query: str, expected: float) -> None:
    """Until the query returns `expected`: each scrape lands within a second or two."""
    deadline = time.monotonic() + WAIT
    result: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        result = evaluate(prometheus, query)
        if len(result) == 1 and float(result[0]["value"][1]) == expected:
            return
        time.sleep(0.2)
    pytest.fail(f"{query!r} never returned {expected}; last result: {result}")


def generate(service: ServiceProcess) -> int:
    with service.client(timeout=WAIT * 2, headers=HEADERS) as client:
        return client.post("/generate", json=HELD).status_code


def wait_for_health(service: ServiceProcess, running: int, queue_depth: int) -> None:
    with service.client() as client:
        deadline = time.monotonic() + WAIT
        while True:
            health = client.get("/health").json()
            if (health["running"], health["queue_depth"]) == (running, queue_depth):
                return
            assert time.monotonic() < deadline, health
            time.sleep(0.05)


def test_the_scaledobject_query_counts_queued_running_and_backlogged_work(
    base: list[Manifest], service: ServiceProcess, prometheus: str, hold_file: Path
) -> None:
    query = only(base, "ScaledObject")["spec"]["triggers"][0]["metadata"]["query"]
    # Idle first: the query reads the live service (0), not an absence of series.
    wait_for_value(prometheus, query, 0)
    wait_for_value(prometheus, BACKLOG, 0)
    with ThreadPoolExecutor(SYNC_REQUESTS) as pool:
        requests = [pool.submit(generate, service) for _ in range(SYNC_REQUESTS)]
        wait_for_health(service, running=1, queue_depth=SYNC_REQUESTS - 1)
        # The thread is busy and requests are queued for it, so async jobs wait in the store.
        with service.client(headers={**HEADERS, "Prefer": "respond-async"}) as client:
            accepted = [client.post("/generate", json=QUICK) for _ in range(ASYNC_JOBS)]
        assert [r.status_code for r in accepted] == [202] * ASYNC_JOBS
        wait_for_value(prometheus, BACKLOG, ASYNC_JOBS)
        # 1 running + 2 queued + 4 in the backlog.
        wait_for_value(prometheus, query, SYNC_REQUESTS + ASYNC_JOBS)
        hold_file.touch()
        assert [request.result(WAIT) for request in requests] == [200] * SYNC_REQUESTS
    # Once the thread is free the backlog runs, and the query falls back to 0.
    wait_for_value(prometheus, query, 0)
    with service.client(headers=HEADERS) as client:
        deadline = time.monotonic() + WAIT
        while True:  # the store is written just after a thread lets go of a job
            statuses = [client.get(r.headers["Location"]).json()["status"] for r in accepted]
            if statuses == ["succeeded"] * ASYNC_JOBS:
                break
            assert time.monotonic() < deadline, statuses
            time.sleep(0.1)
