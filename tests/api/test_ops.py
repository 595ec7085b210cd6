"""/health and /livez while the service drains, in process on fake engines.

A drain begins when uvicorn's shutdown begins (`DrainingServer.shutdown` calls the pool's
`begin_drain`); uvicorn closes the port in the same moment, so over real HTTP nobody can ask
/health any more. In process the app keeps answering, which is what these tests read.
"""

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from ovis_service.api.dependencies import services_in
from ovis_service.app import create_app
from ovis_service.config import Settings
from tests.support.fakes import FakeEngine
from tests.support.in_process import ready_client, wait_for_health

pytestmark = pytest.mark.timeout(60)

BODY = {"prompt": "a fox", "num_inference_steps": 2, "image_size": 256, "seed": 5}
WAIT = 10.0
DRAIN_TIMEOUT = 30.0


@pytest.fixture
def gate() -> threading.Event:
    """Holds every generation before its first step until the test opens it."""
    return threading.Event()


@pytest.fixture
def app(gate: threading.Event) -> Litestar:
    engines = [FakeEngine(gate=gate), FakeEngine(gate=gate)]
    return create_app(Settings(model="fake", warmup=False), engines=engines)


@pytest.fixture
def client(app: Litestar) -> Iterator[TestClient[Litestar]]:
    with ready_client(app) as client:
        yield client


def test_health_says_draining_per_device_while_accepted_work_finishes(
    app: Litestar, client: TestClient[Litestar], gate: threading.Event
) -> None:
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(client.post, "/generate", json=BODY)
        try:
            wait_for_health(client, lambda body: body["running"] == 1)
            services_in(app.state).worker.begin_drain(DRAIN_TIMEOUT)  # what SIGTERM starts
            draining = client.get("/health")
            assert draining.status_code == 503
            body = draining.json()
            assert body["status"] == "draining"
            assert body["model_loaded"] is True  # still loaded: only new work is refused
            assert (body["running"], body["queue_depth"]) == (1, 0)
            # The device with the held job is busy; the idle one takes no new work.
            assert sorted(device["state"] for device in body["devices"]) == ["busy", "draining"]
            busy = next(device for device in body["devices"] if device["state"] == "busy")
            assert busy["total_steps"] == 2
            # Alive: a drain is no reason to restart the process.
            assert client.get("/livez").status_code == 200
            refused = client.post("/generate", json=BODY)
            assert refused.status_code == 503
            assert refused.json()["detail"] == "the service is shutting down"
            assert refused.headers["retry-after"] == "5"
        finally:
            gate.set()  # a failed check above must fail, not wait for the gate's give-up
        assert held.result(WAIT).status_code == 200  # accepted before the drain: answered

    drained = wait_for_health(client, lambda body: body["running"] == 0)
    assert drained["status"] == "draining"
    assert [device["state"] for device in drained["devices"]] == ["draining", "draining"]
