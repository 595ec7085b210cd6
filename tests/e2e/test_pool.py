"""End to end with two inference threads on the CPU (`OVIS_DEVICES=cpu`, `--workers 2`) and the
tiny real pipeline: jobs run side by side, a seed gives the same bytes on either thread, and
SIGTERM drains both threads and exits 0."""

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.service import TINY_COMMAND, ServiceProcess, run_service

pytestmark = pytest.mark.timeout(300)

# Big enough that two runs overlap for several seconds on a busy 2-core machine (about 6 s each
# when idle), so that the health and metrics reads land while both run; small enough to keep
# the test short.
SLOW = {"prompt": "a red fox in the snow", "num_inference_steps": 16, "image_size": 1024, "seed": 7}
WAIT = 120.0


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    env = {"OVIS_DEVICES": "cpu", "OVIS_WARMUP": "false"}
    command = [*TINY_COMMAND, "--workers", "2"]
    with run_service(tmp_path_factory.mktemp("pool"), env=env, command=command) as service:
        yield service


def post(service: ServiceProcess, body: dict[str, Any]) -> httpx.Response:
    with service.client(timeout=WAIT) as client:
        return client.post("/generate", json=body)


def wait_until_both_busy(client: httpx.Client) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT
    while True:
        health: dict[str, Any] = client.get("/health").json()
        if health["running"] == 2:
            return health
        assert time.monotonic() < deadline, health
        time.sleep(0.02)


def running_jobs_metric(client: httpx.Client) -> float:
    text = client.get("/metrics").text
    [family] = [f for f in text_string_to_metric_families(text) if f.name == "ovis_running_jobs"]
    return family.samples[0].value


def test_two_threads_serve_side_by_side_with_the_same_bytes_for_a_seed(
    service: ServiceProcess,
) -> None:
    with service.client() as client, ThreadPoolExecutor(2) as pool:
        health = client.get("/health").json()
        assert [(d["device"], d["state"]) for d in health["devices"]] == [("cpu", "ready")] * 2
        futures: list[Future[httpx.Response]] = [pool.submit(post, service, SLOW) for _ in range(2)]
        health = wait_until_both_busy(client)
        assert [d["state"] for d in health["devices"]] == ["busy", "busy"]
        assert running_jobs_metric(client) == 2
        first, second = (future.result(WAIT) for future in futures)
    assert first.status_code == second.status_code == 200
    assert first.content == second.content  # one ran on each thread, with its own pipeline
    assert first.headers["x-seed"] == "7"


def test_sigterm_drains_both_threads_and_exits_zero(service: ServiceProcess) -> None:
    with service.client() as client, ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(post, service, {**SLOW, "seed": seed}) for seed in (1, 2)]
        wait_until_both_busy(client)
        code = service.terminate(timeout=WAIT)
        responses = [future.result(WAIT) for future in futures]
    assert [response.status_code for response in responses] == [200, 200]
    assert code == 0
    events = [line.get("event") for line in service.logs()]
    assert events.count("inference_thread_stopped") == 2
    assert "exited_clean" in events
