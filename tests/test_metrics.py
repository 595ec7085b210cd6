"""/metrics, /livez and /health's devices, in process on fake engines, after real requests; the
exposition is read back with prometheus_client's own parser."""

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar import Litestar
from litestar.testing import TestClient
from prometheus_client.parser import text_string_to_metric_families

from ovis_service.app import create_app
from ovis_service.config import Settings
from tests.support.fakes import BrokenRecoveryEngine, FakeEngine
from tests.support.service import FAKE_COMMAND, ServiceProcess, run_service
from tests.support.worker import GatedLoadEngine

pytestmark = pytest.mark.timeout(60)

BODY = {"prompt": "a fox", "num_inference_steps": 2, "image_size": 256, "seed": 5}
WAIT = 10.0

Client = TestClient[Litestar]


def settings(**overrides: Any) -> Settings:
    return Settings(model="fake", warmup=False, **overrides)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def samples(client: Client | httpx.Client, **headers: str) -> Samples:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse(response.text)


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def wait_for(client: Client | httpx.Client, path: str, predicate: Any) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT
    while True:
        body: dict[str, Any] = client.get(path).json()
        if predicate(body):
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.01)


@pytest.fixture(scope="module")
def hold_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Created by a test to release the service's `held...` jobs."""
    return tmp_path_factory.mktemp("hold") / "release"


# Two threads and three queue places: five jobs fit, the sixth is refused.
THREADS, QUEUE_SIZE = 2, 3


@pytest.fixture(scope="module")
def pool_service(
    tmp_path_factory: pytest.TempPathFactory, hold_file: Path
) -> Iterator[ServiceProcess]:
    """The real server over two fake engines; `held...` jobs run until `hold_file` exists."""
    env = {
        "FAKE_ENGINES": str(THREADS),
        "FAKE_STEP_SECONDS": "0.01",
        "FAKE_HOLD_FILE": str(hold_file),
        "OVIS_QUEUE_SIZE": str(QUEUE_SIZE),
    }
    with run_service(tmp_path_factory.mktemp("pool"), env=env, command=FAKE_COMMAND) as service:
        yield service


def test_counters_gauges_and_histograms_follow_real_requests(
    pool_service: ServiceProcess, hold_file: Path
) -> None:
    held = THREADS + QUEUE_SIZE
    with pool_service.client() as client:
        before = samples(client)
        assert value(before, "ovis_queue_capacity") == QUEUE_SIZE
        assert value(before, "ovis_model_loaded") == 1
        assert value(before, "ovis_inference_threads_alive") == THREADS
        assert value(before, "ovis_rejected_total", reason="queue_full") == 0
        assert ("process_cpu_seconds_total", ()) in before

        # Held until the busy state has been read: no race with the clock. The held requests
        # are as many as the places (threads and queue), so none is refused however fast the
        # threads take their jobs; the threads are filled before the queue, so the count also
        # holds where only queue places count. The request after them finds no place.
        slow = {**BODY, "prompt": "held fox"}
        with ThreadPoolExecutor(held) as pool:
            try:
                posts = [pool.submit(post, pool_service, slow) for _ in range(THREADS)]
                wait_for(client, "/health", lambda body: body["running"] == THREADS)
                posts += [pool.submit(post, pool_service, slow) for _ in range(QUEUE_SIZE)]
                health = wait_for(client, "/health", lambda body: body["queue_depth"] == QUEUE_SIZE)
                assert [device["state"] for device in health["devices"]] == ["busy"] * THREADS
                busy = samples(client)
                assert value(busy, "ovis_running_jobs") == THREADS
                assert value(busy, "ovis_queue_depth") == QUEUE_SIZE
                refused = client.post("/generate", json=BODY)
                assert refused.status_code == 503
                assert client.get("/livez").status_code == 200  # a full queue is not dead
            finally:
                hold_file.touch()  # a failed check above must fail, not wait for the give-up
            assert [future.result(WAIT) for future in posts] == [200] * held
        assert client.post("/generate", json={**BODY, "image_size": 100}).status_code == 422

        after = samples(client)
    assert value(after, "ovis_requests_total", endpoint="/generate", status="200") == held
    assert value(after, "ovis_requests_total", endpoint="/generate", status="503") == 1
    assert value(after, "ovis_requests_total", endpoint="/generate", status="422") == 1
    assert value(after, "ovis_rejected_total", reason="queue_full") == 1
    assert value(after, "ovis_generation_seconds_count") == held
    assert value(after, "ovis_queue_wait_seconds_count") == held
    assert value(after, "ovis_running_jobs") == 0
    assert value(after, "ovis_queue_depth") == 0


def post(service: ServiceProcess, body: dict[str, Any]) -> int:
    with service.client() as client:
        return client.post("/generate", json=body).status_code


def test_each_app_counts_in_its_own_registry() -> None:
    first = create_app(settings(), engine=FakeEngine())
    second = create_app(settings(), engine=FakeEngine())
    with TestClient(first) as one, TestClient(second) as two:
        wait_for(one, "/health", lambda body: body["status"] == "ok")
        wait_for(two, "/health", lambda body: body["status"] == "ok")
        assert one.post("/generate", json=BODY).status_code == 200
        generated = ("ovis_requests_total", (("endpoint", "/generate"), ("status", "200")))
        assert samples(one)[generated] == 1
        assert generated not in samples(two)


def test_requests_are_counted_by_route_template_never_by_raw_path() -> None:
    """A label per raw path would let a scan of random URLs grow the series without bound."""
    with TestClient(create_app(settings(), engine=FakeEngine())) as client:
        wait_for(client, "/health", lambda body: body["status"] == "ok")
        assert client.get("/v1/models/fake").status_code == 200
        assert client.get("/v1/models/gpt-image-1").status_code == 404
        assert client.get("/wp-login.php").status_code == 404
        assert client.get("/no/such/route").status_code == 404
        found = samples(client)
    endpoints = {
        dict(labels)["endpoint"] for name, labels in found if name == "ovis_requests_total"
    }
    # A route by its template as Litestar reports it (no `:path` type), every unrouted path as one.
    assert endpoints == {"/health", "/v1/models/{model_id}", "unmatched"}
    assert value(found, "ovis_requests_total", endpoint="/v1/models/{model_id}", status="200") == 1
    assert value(found, "ovis_requests_total", endpoint="/v1/models/{model_id}", status="404") == 1
    assert value(found, "ovis_requests_total", endpoint="unmatched", status="404") == 2


def test_metrics_need_the_api_key_unless_made_public() -> None:
    with TestClient(create_app(settings(api_keys=("k1",)), engine=FakeEngine())) as client:
        assert client.get("/metrics").status_code == 401
        samples(client, authorization="Bearer k1")
    public = settings(api_keys=("k1",), metrics_public=True)
    with TestClient(create_app(public, engine=FakeEngine())) as client:
        samples(client)
        assert client.post("/generate", json=BODY).status_code == 401  # only /metrics opened


def test_livez_is_200_while_loading_and_ready_and_503_once_the_model_failed() -> None:
    engine = GatedLoadEngine()
    with TestClient(create_app(settings(), engine=engine)) as client:
        assert engine.load_started.wait(WAIT)
        assert client.get("/health").status_code == 503
        livez = client.get("/livez")
        assert livez.status_code == 200
        assert livez.json() == {"status": "alive", "threads": 1, "threads_alive": 1, "detail": None}
        engine.load_gate.set()
        wait_for(client, "/health", lambda body: body["status"] == "ok")
        assert client.get("/livez").status_code == 200
    broken = FakeEngine(load_error=OSError("gone"))
    with TestClient(create_app(settings(), engine=broken)) as client:
        body = wait_for(client, "/livez", lambda body: body["status"] != "alive")
        assert body["status"] == "failed"
        assert client.get("/livez").status_code == 503
        assert value(samples(client), "ovis_model_loaded") == 0


def test_a_dead_thread_turns_livez_and_health_503_and_shows_in_devices() -> None:
    engines = [BrokenRecoveryEngine(), BrokenRecoveryEngine()]
    with TestClient(create_app(settings(), engines=engines)) as client:
        wait_for(client, "/health", lambda body: body["status"] == "ok")
        assert client.post("/generate", json={**BODY, "prompt": "oom kills"}).status_code == 503
        livez = client.get("/livez")
        assert livez.status_code == 503
        assert livez.json()["threads_alive"] == 1
        health = client.get("/health")
        assert health.status_code == 503
        assert sorted(d["state"] for d in health.json()["devices"]) == ["dead", "ready"]
        assert value(samples(client), "ovis_inference_threads_alive") == 1
