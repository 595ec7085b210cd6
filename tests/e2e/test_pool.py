"""End to end with two inference threads on the CPU (`OVIS_DEVICES=cpu`, `--workers 2`), a queue
of one (`OVIS_QUEUE_SIZE=1`) and the tiny real pipeline: idle threads count as capacity, jobs run
side by side, a seed gives the same bytes on either thread, and SIGTERM drains both threads and
exits 0 (last, since it stops the module's one service)."""

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import openai
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
    env = {"OVIS_DEVICES": "cpu", "OVIS_WARMUP": "false", "OVIS_QUEUE_SIZE": "1"}
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


QUICK = {"prompt": "a lighthouse", "num_inference_steps": 2, "image_size": 256}
ROUNDS = 12


def post_together(service: ServiceProcess, bodies: list[dict[str, Any]]) -> list[int]:
    """Send every body at the same instant (a barrier releases the threads) and return the
    status codes in the order of `bodies`."""
    barrier = threading.Barrier(len(bodies))
    clients = [service.client(timeout=WAIT) for _ in bodies]
    for client in clients:  # connect first, so the barrier releases requests, not handshakes
        assert client.get("/livez").status_code == 200

    def send(index: int) -> int:
        barrier.wait(WAIT)
        return clients[index].post("/generate", json=bodies[index]).status_code

    try:
        with ThreadPoolExecutor(len(bodies)) as pool:
            return list(pool.map(send, range(len(bodies))))
    finally:
        for client in clients:
            client.close()


def test_two_requests_arriving_together_on_two_idle_threads_are_both_served(
    service: ServiceProcess,
) -> None:
    for round_number in range(ROUNDS):
        bodies = [{**QUICK, "seed": round_number * 2 + i} for i in range(2)]
        assert post_together(service, bodies) == [200, 200], f"round {round_number}"


def test_n_2_on_the_idle_pair_is_served(service: ServiceProcess) -> None:
    client = openai.OpenAI(base_url=service.base_url + "/v1", api_key="unused", max_retries=0)
    result = client.images.generate(
        prompt="two lighthouses",
        n=2,
        size="256x256",
        extra_body={"num_inference_steps": 2, "seed": 11},
    )
    assert [image.model_extra["seed"] for image in result.data or []] == [11, 12]


def test_four_slow_requests_together_get_three_answers_and_one_503(
    service: ServiceProcess,
) -> None:
    slow = {**SLOW, "num_inference_steps": 6}  # still seconds: all four arrive long before
    statuses = post_together(service, [{**slow, "seed": seed} for seed in range(4)])
    # Two threads and one queue place: three are taken, the fourth is refused at once.
    assert sorted(statuses) == [200, 200, 200, 503]


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
