"""Async jobs outlive the process that took them: a SIGKILL loses none of them, SIGTERM finishes
(or hands back) the running one and leaves the queue in the store, and a data directory that
cannot hold the store stops startup with one line that names OVIS_DATA_DIR.

The fake service with one inference thread and a hold file makes the states exact: a `held...`
prompt runs until the test creates the file, so one job is running and the rest are queued for
as long as the test needs, whatever the machine's load.
"""

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from ovis_service.config import Settings
from ovis_service.store.database import open_database
from ovis_service.store.job_store import JobStore
from ovis_service.store.records import JobStatus
from tests.support.service import FAKE_COMMAND, REPO_ROOT, TINY_COMMAND, ServiceProcess, run_service

pytestmark = pytest.mark.timeout(180)

WAIT = 60.0
PREFER_ASYNC = {"Prefer": "respond-async"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "OVIS_DATA_DIR": str(tmp_path / "data"),
        "FAKE_HOLD_FILE": str(tmp_path / "hold"),
        "FAKE_STEP_SECONDS": "0.02",
        **extra,
    }


def submit(client: httpx.Client, prompt: str, seed: int, steps: int = 4) -> str:
    body = {"prompt": prompt, "seed": seed, "num_inference_steps": steps, "image_size": 256}
    response = client.post("/generate", json=body, headers=PREFER_ASYNC)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    assert response.headers["location"] == f"/jobs/{job_id}"
    return job_id


def status(client: httpx.Client, job_id: str) -> str:
    response = client.get(f"/jobs/{job_id}")
    assert response.status_code == 200, response.text
    value: str = response.json()["status"]
    return value


def wait_for_status(client: httpx.Client, job_id: str, wanted: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT
    while True:
        job: dict[str, Any] = client.get(f"/jobs/{job_id}").json()
        if job["status"] == wanted:
            return job
        assert job["status"] in ("queued", "running"), job  # finished some other way
        assert time.monotonic() < deadline, f"{job_id} still {job['status']}, not {wanted}"
        time.sleep(0.05)


def check_image(client: httpx.Client, job: dict[str, Any], seed: int) -> bytes:
    """The job's one image is served from its URL, as the PNG its seed made."""
    [image] = job["images"]
    assert image["seed"] == seed
    response = client.get(image["url"])
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-seed"] == str(seed)
    assert response.content.startswith(PNG_MAGIC)
    return response.content


def started_jobs(service: ServiceProcess) -> list[str]:
    return [line["job_id"] for line in service.logs() if line.get("event") == "job_started"]


def stored_statuses(data_dir: Path, job_ids: list[str]) -> list[JobStatus]:
    """What the store holds while no service runs: read through the store itself, since no
    process is up to answer GET /jobs."""
    store = JobStore(open_database(Settings(data_dir=str(data_dir))), ttl=86400)
    try:
        records = [store.get_any(job_id) for job_id in job_ids]
    finally:
        store.close()
    assert all(record is not None for record in records)
    return [record.status for record in records if record is not None]


def one_running_and_the_rest_queued(service: ServiceProcess, count: int) -> list[str]:
    """Submit `count` held jobs; the first runs (held), the others wait in the store."""
    with service.client() as client:
        job_ids = [submit(client, f"held job {seed}", seed) for seed in range(count)]
        wait_for_status(client, job_ids[0], "running")
        assert [status(client, job_id) for job_id in job_ids[1:]] == ["queued"] * (count - 1)
    return job_ids


def test_sigkill_loses_no_job_and_the_running_one_starts_again(tmp_path: Path) -> None:
    env = fake_env(tmp_path)
    with run_service(tmp_path, env=env, command=FAKE_COMMAND) as first:
        job_ids = one_running_and_the_rest_queued(first, 4)
        first.process.kill()
        assert first.process.wait(timeout=WAIT) == -signal.SIGKILL
    killed_at = time.monotonic()

    with run_service(tmp_path, env=env, command=FAKE_COMMAND) as second:
        ready_s = time.monotonic() - killed_at
        with second.client() as client:
            # The start requeued the job the dead process held; being oldest it runs first.
            wait_for_status(client, job_ids[0], "running")
            assert [status(client, job_id) for job_id in job_ids[1:]] == ["queued"] * 3
            released_at = time.monotonic()
            Path(env["FAKE_HOLD_FILE"]).touch()
            finished_s: list[float] = []
            for seed, job_id in enumerate(job_ids):
                job = wait_for_status(client, job_id, "succeeded")
                finished_s.append(time.monotonic() - released_at)
                check_image(client, job, seed)
        logs = second.logs()
    requeued = [line for line in logs if line.get("event") == "jobs_requeued"]
    assert [line["jobs"] for line in requeued] == [[job_ids[0]]]
    assert started_jobs(second) == job_ids  # the interrupted one again, then the queue in order
    print(
        f"crash: 4 jobs (1 running, 3 queued) survived SIGKILL; restart ready {ready_s:.2f} s "
        f"after the kill; after releasing the hold they finished at "
        + ", ".join(f"{seconds:.2f}" for seconds in finished_s)
        + " s; the interrupted job was requeued and ran first"
    )


def test_sigterm_finishes_the_running_job_and_leaves_the_queue_in_the_store(
    tmp_path: Path,
) -> None:
    env = fake_env(tmp_path)
    with run_service(tmp_path, env=env, command=FAKE_COMMAND) as first:
        job_ids = one_running_and_the_rest_queued(first, 3)
        first.process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert first.process.poll() is None, "exited without waiting for the running job"
        Path(env["FAKE_HOLD_FILE"]).touch()
        assert first.process.wait(timeout=WAIT) == 0
        first_started = started_jobs(first)
    assert first_started == job_ids[:1]
    data_dir = Path(env["OVIS_DATA_DIR"])
    assert stored_statuses(data_dir, job_ids) == [
        JobStatus.SUCCEEDED,
        JobStatus.QUEUED,
        JobStatus.QUEUED,
    ]

    with run_service(tmp_path, env=env, command=FAKE_COMMAND) as second:
        with second.client() as client:
            for seed, job_id in enumerate(job_ids):
                check_image(client, wait_for_status(client, job_id, "succeeded"), seed)
        assert started_jobs(second) == job_ids[1:]  # the finished one did not run twice


def test_sigterm_past_the_drain_timeout_hands_the_running_job_back(tmp_path: Path) -> None:
    # 100 steps of 0.1 s outlast a 1 s drain; after it the job stops at its next step.
    env = fake_env(tmp_path, OVIS_DRAIN_TIMEOUT="1", FAKE_STEP_SECONDS="0.1")
    with run_service(tmp_path, env=env, command=FAKE_COMMAND) as first:
        with first.client() as client:
            job_ids = [submit(client, f"slow job {seed}", seed, steps=100) for seed in range(2)]
            wait_for_status(client, job_ids[0], "running")
            assert status(client, job_ids[1]) == "queued"
        sent_at = time.monotonic()
        assert first.terminate(timeout=WAIT) == 0
        exit_s = time.monotonic() - sent_at
        events = [line.get("event") for line in first.logs()]
    assert "job_released" in events
    assert exit_s < 10.0, f"exit took {exit_s:.1f} s, longer than the job itself"
    data_dir = Path(env["OVIS_DATA_DIR"])
    assert stored_statuses(data_dir, job_ids) == [JobStatus.QUEUED, JobStatus.QUEUED]

    faster = {**env, "FAKE_STEP_SECONDS": "0.005"}
    with (
        run_service(tmp_path, env=faster, command=FAKE_COMMAND) as second,
        second.client() as client,
    ):
        for seed, job_id in enumerate(job_ids):
            check_image(client, wait_for_status(client, job_id, "succeeded"), seed)


def test_a_data_dir_under_a_file_stops_startup_with_one_line_naming_the_setting(
    tmp_path: Path,
) -> None:
    # Root writes through permission bits, but nobody makes a directory inside a regular file.
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    env = {key: value for key, value in os.environ.items() if not key.startswith("OVIS_")}
    env.update(
        {
            "OVIS_MODEL": "tiny",
            "OVIS_DEVICES": "cpu",
            "OVIS_HOST": "127.0.0.1",
            "OVIS_DATA_DIR": str(blocker / "data"),
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(REPO_ROOT),
        }
    )
    result = subprocess.run(
        TINY_COMMAND,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "OVIS_DATA_DIR" in lines[0]
    assert str(blocker / "data") in lines[0]
