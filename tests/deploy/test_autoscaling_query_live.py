"""The KEDA query, evaluated for real: Debian's Prometheus scrapes a running service (the real
app and server over a fake engine, with an API key, as deploy/prometheus/scrape-with-key.yaml
does), work goes into the queue, and the exact query string from the rendered ScaledObject,
asked through Prometheus' HTTP API, must see it."""

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
WAIT = 60.0
# Each job takes 100 steps of 0.5 s: long enough to stay queued or running while scraped.
HELD = {"prompt": "hold", "num_inference_steps": 100, "image_size": 256, "seed": 1}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    env = {
        "FAKE_STEP_SECONDS": "0.5",
        "OVIS_API_KEY": API_KEY,
        "OVIS_DRAIN_TIMEOUT": "0",  # the held jobs end at once when the test stops the service
    }
    with run_service(tmp_path_factory.mktemp("svc"), env=env, command=FAKE_COMMAND) as service:
        yield service


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
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with service.client(timeout=WAIT * 2, headers=headers) as client:
        return client.post("/generate", json=HELD).status_code


def test_the_scaledobject_query_sees_queued_and_running_work(
    base: list[Manifest], service: ServiceProcess, prometheus: str
) -> None:
    query = only(base, "ScaledObject")["spec"]["triggers"][0]["metadata"]["query"]
    # Idle first: the query reads the live service (0), not an absence of series.
    wait_for_value(prometheus, query, 0)
    with ThreadPoolExecutor(4) as pool:
        requests = [pool.submit(generate, service) for _ in range(4)]
        with service.client() as client:
            deadline = time.monotonic() + WAIT
            while (health := client.get("/health").json())["queue_depth"] != 3:
                assert time.monotonic() < deadline, health
                time.sleep(0.05)
        assert health["running"] == 1
        wait_for_value(prometheus, query, 4)  # 1 running + 3 queued
        # Stopping with OVIS_DRAIN_TIMEOUT=0 ends the held jobs at once.
        assert service.terminate(timeout=WAIT) == 0
        assert sorted(request.result(WAIT) for request in requests) == [503] * 4
