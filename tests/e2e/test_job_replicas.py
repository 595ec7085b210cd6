"""Two replicas sharing one PostgreSQL job store: a job submitted to a busy replica runs on the
idle one, any replica answers for any job (status, events, cancel, images), the backlog is split
between them, and a job left running by a replica that died runs on the other after its lease.

Both replicas are fake services with one inference thread each. A `held...` synchronous request
keeps a replica busy until the test creates that replica's hold file, so which replica may claim
jobs is decided by the test, not by timing. The module shares its two processes; the last test
kills one of them.
"""

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.postgres import (
    PostgresServer,
    postgres_server,  # noqa: F401
)
from tests.support.service import FAKE_COMMAND, ServiceProcess, run_service
from tests.support.sse import read_events

pytestmark = pytest.mark.timeout(180)

WAIT = 60.0
PREFER_ASYNC = {"Prefer": "respond-async"}
STEP_SECONDS = 0.05
QUICK_STEPS = 4  # 0.2 s a job
LEASE_SECONDS = 6  # OVIS_JOB_LEASE: the shortest allowed, so the lease test takes seconds
SLOW_STEPS = 200  # 10 s, several heartbeats: a cancel sent to the other replica lands mid-run


@dataclass
class Replica:
    name: str
    service: ServiceProcess
    hold_file: Path

    def client(self) -> httpx.Client:
        return self.service.client(timeout=WAIT)

    def started(self) -> list[str]:
        return [
            line["job_id"] for line in self.service.logs() if line.get("event") == "job_started"
        ]


@pytest.fixture(scope="module")
def replicas(
    postgres_server: PostgresServer,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Replica, Replica]]:
    postgres_server.create_database("job_replicas")
    url = postgres_server.plain_url_for("job_replicas")
    with (
        _replica("a", url, tmp_path_factory) as a,
        _replica("b", url, tmp_path_factory) as b,
    ):
        yield a, b


@contextmanager
def _replica(name: str, url: str, factory: pytest.TempPathFactory) -> Iterator[Replica]:
    directory = factory.mktemp(f"replica-{name}")
    env = {
        "OVIS_DATABASE_URL": url,
        "FAKE_ENGINES": "1",
        "FAKE_STEP_SECONDS": str(STEP_SECONDS),
        "FAKE_HOLD_FILE": str(directory / "hold"),
        "OVIS_MAX_STEPS": str(SLOW_STEPS),
        "OVIS_JOB_LEASE": str(LEASE_SECONDS),
    }
    with run_service(directory, env=env, command=FAKE_COMMAND) as service:
        yield Replica(name, service, directory / "hold")


@contextmanager
def busy(replica: Replica) -> Iterator[None]:
    """Keep the replica's one thread on a held synchronous request, so it claims no job; on
    exit release it and check the request was answered."""
    replica.hold_file.unlink(missing_ok=True)
    body = {"prompt": "held busy", "num_inference_steps": 2, "image_size": 256, "seed": 1}
    with replica.client() as client, ThreadPoolExecutor(1) as pool:
        answer: Future[httpx.Response] = pool.submit(client.post, "/generate", json=body)
        deadline = time.monotonic() + WAIT
        while client.get("/health").json()["running"] != 1:
            assert not answer.done(), answer.result().text
            assert time.monotonic() < deadline, "the held request never started"
            time.sleep(0.02)
        try:
            yield
        finally:
            replica.hold_file.touch()
            response = answer.result(WAIT)
            # The next `busy` must hold again.
            replica.hold_file.unlink()
    assert response.status_code == 200, response.text


def submit(replica: Replica, prompt: str, seed: int, steps: int = QUICK_STEPS) -> str:
    body = {"prompt": prompt, "seed": seed, "num_inference_steps": steps, "image_size": 256}
    with replica.client() as client:
        response = client.post("/generate", json=body, headers=PREFER_ASYNC)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def wait_for_status(replica: Replica, job_id: str, wanted: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT
    with replica.client() as client:
        while True:
            job: dict[str, Any] = client.get(f"/jobs/{job_id}").json()
            if job["status"] == wanted:
                return job
            assert job["status"] in ("queued", "running"), job
            assert time.monotonic() < deadline, f"{job_id} still {job['status']}, not {wanted}"
            time.sleep(0.05)


def wait_until_started(replica: Replica, job_id: str) -> None:
    deadline = time.monotonic() + WAIT
    while job_id not in replica.started():
        assert time.monotonic() < deadline, f"{job_id} never started on {replica.name}"
        time.sleep(0.02)


def image_bytes(replica: Replica, url: str) -> bytes:
    with replica.client() as client:
        response = client.get(url)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return response.content


def test_jobs_sent_to_a_busy_replica_run_on_the_idle_one(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    with busy(a):
        job_ids = [submit(a, f"backlog {seed}", seed) for seed in range(6)]
        for job_id in job_ids:
            wait_for_status(a, job_id, "succeeded")
        ran_on_a = set(a.started())
    assert set(job_ids) <= set(b.started())
    assert not ran_on_a & set(job_ids)


def test_the_replica_that_did_not_run_a_job_follows_serves_and_cancels_it(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    with busy(a):
        # Followed on A from the moment it is queued; it runs on B.
        followed = submit(a, "followed", 21, steps=40)
        with a.client() as client, client.stream("GET", f"/jobs/{followed}/events") as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = read_events(stream)
        names = [name for name, _ in events]
        assert names[-1] == "done", names
        assert "progress" in names  # steps on B reach a client of A through the store
        done: dict[str, Any] = events[-1][1]
        assert done["status"] == "succeeded"
        [image] = done["images"]
        url: str = image["url"]
        assert url.startswith(a.service.base_url)
        from_a = image_bytes(a, url)
        # The same token on the replica that made it gives the same bytes.
        assert from_a == image_bytes(b, url.replace(a.service.base_url, b.service.base_url))
        assert followed in b.started()

        cancelled = submit(a, "cancelled", 22, steps=SLOW_STEPS)
        wait_until_started(b, cancelled)
        with a.client() as client:
            response = client.post(f"/jobs/{cancelled}/cancel")
        assert response.status_code == 200, response.text
        asked_at = time.monotonic()
        job = wait_for_status(a, cancelled, "cancelled")
        stopped_s = time.monotonic() - asked_at
        assert job["error"]["code"] == "cancelled"
        assert job["images"] == []
    # B hears of the cancel at its next heartbeat (2 s), long before the job's 10 s are up.
    assert stopped_s < SLOW_STEPS * STEP_SECONDS / 2, f"stopped after {stopped_s:.1f} s"
    assert not {followed, cancelled} & set(a.started())


def test_both_replicas_take_from_one_backlog(replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    before = {a.name: set(a.started()), b.name: set(b.started())}
    job_ids = [submit((a, b)[seed % 2], f"shared {seed}", seed) for seed in range(12)]
    for job_id in job_ids:
        wait_for_status(a, job_id, "succeeded")
    split = {
        replica.name: len((set(replica.started()) - before[replica.name]) & set(job_ids))
        for replica in (a, b)
    }
    print(f"replicas: 12 jobs sent alternately to a and b ran {split}")
    assert sum(split.values()) == 12  # each ran once, on one replica
    assert min(split.values()) > 0, split


def test_a_job_left_running_by_a_killed_replica_runs_on_the_other_after_the_lease(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    with busy(b):
        job_id = submit(a, "orphaned", 31, steps=40)
        wait_until_started(a, job_id)
        a.service.process.kill()
        a.service.process.wait(timeout=WAIT)
        killed_at = time.monotonic()
    job = wait_for_status(b, job_id, "succeeded")
    finished_s = time.monotonic() - killed_at
    assert job_id in b.started()
    requeued = [
        line["jobs"]
        for line in b.service.logs()
        if line.get("event") == "jobs_requeued" and line.get("reason") == "lease expired"
    ]
    assert requeued == [[job_id]]
    assert len(image_bytes(b, job["images"][0]["url"])) > 0
    # A renewed its lease at most one heartbeat (2 s) before it died.
    assert finished_s > LEASE_SECONDS - 2.5, f"requeued after only {finished_s:.1f} s"
    print(
        f"replicas: the job running on a when it was killed finished on b {finished_s:.1f} s "
        f"later (lease {LEASE_SECONDS:.0f} s)"
    )
