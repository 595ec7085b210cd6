"""Section 4, faults: injected through the `Engine` seam (tests/reliability/fault_service.py),
into the real app and server, over HTTP. After each one the service must keep serving, work
that was cancelled must not be done, and the log must say what happened."""

import math
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from litestar.testing import TestClient

from ovis_service.app import create_app
from ovis_service.config import load_settings
from tests.reliability import rawhttp
from tests.reliability.conftest import (
    FAULT_COMMAND,
    assert_still_serving,
    log_lines,
    wait_for_log,
    wait_until,
)
from tests.reliability.fault_service import CUDA_POISONED, FaultEngine
from tests.reliability.figures import FigureBook
from tests.support.fakes import SECRET_IN_ERROR
from tests.support.service import ServiceProcess, run_service

STEP = 0.05  # seconds per fake denoising step
NORMAL = {"prompt": "normal", "num_inference_steps": 2, "image_size": 256}


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    env = {"FAKE_STEP_SECONDS": str(STEP), "OVIS_QUEUE_SIZE": "4"}
    with run_service(tmp_path_factory.mktemp("faults"), env=env, command=FAULT_COMMAND) as svc:
        yield svc


def _generate(service: ServiceProcess, prompt: str, steps: int, request_id: str) -> httpx.Response:
    with service.client(timeout=60) as client:
        return client.post(
            "/generate",
            json={"prompt": prompt, "num_inference_steps": steps, "image_size": 256},
            headers={"X-Request-ID": request_id},
        )


def test_a_pipeline_that_raises_gets_a_generic_500_and_the_service_keeps_serving(
    faults: ServiceProcess,
) -> None:
    response = _generate(faults, "fail-now", 2, "fault-raise")
    assert response.status_code == 500
    assert response.json() == {
        "detail": "internal error while generating the image",
        "request_id": "fault-raise",
    }
    assert SECRET_IN_ERROR not in response.text
    assert "Traceback" not in response.text
    failed = wait_for_log(faults, "job_failed", request_id="fault-raise")
    assert failed["level"] == "error"
    assert SECRET_IN_ERROR in failed["exception"]  # the operator gets the whole story
    assert_still_serving(faults, NORMAL)


def test_cuda_out_of_memory_gets_503_with_retry_after_and_the_service_keeps_serving(
    faults: ServiceProcess,
) -> None:
    response = _generate(faults, "oom-now", 2, "fault-oom")
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) >= 1
    assert "out of memory" in response.json()["detail"]
    line = wait_for_log(faults, "job_out_of_memory", request_id="fault-oom")
    assert line["level"] == "warning"
    # The engine freed its cache after the error, once.
    recovered = wait_for_log(faults, "engine_recovered_from_oom")
    assert recovered["recoveries"] == 1
    events = [entry.get("event") for entry in faults.logs()]
    assert events.index("job_out_of_memory") < events.index("engine_recovered_from_oom")
    assert_still_serving(faults, NORMAL)


def _open_generation(
    service: ServiceProcess, prompt: str, steps: int, request_id: str
) -> socket.socket:
    """Send a /generate request on a raw socket and leave it waiting for the answer."""
    body = f'{{"prompt": "{prompt}", "num_inference_steps": {steps}, "image_size": 256}}'.encode()
    host, port = service.base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = rawhttp.post_head("/generate", f"X-Request-ID: {request_id}", length=len(body))
    sock.sendall(head + b"\r\n\r\n" + body)
    return sock


def test_a_client_that_disconnects_while_queued_is_never_started(
    faults: ServiceProcess, figures: FigureBook
) -> None:
    # `ahead` runs for 2 s; `leaver` waits behind it and hangs up.
    results: list[httpx.Response] = []
    ahead = threading.Thread(
        target=lambda: results.append(_generate(faults, "ahead", 40, "fault-ahead"))
    )
    ahead.start()
    wait_for_log(faults, "engine_started", label="ahead")
    leaver = _open_generation(faults, "leaver", 40, "fault-leaver")
    with faults.client() as client:
        wait_until(lambda: client.get("/health").json()["queue_depth"] == 1)
    leaver.close()
    ahead.join(timeout=60)
    assert [r.status_code for r in results] == [200]
    skipped = wait_for_log(faults, "job_skipped", request_id="fault-leaver")
    assert skipped["reason"] == "client_disconnected"
    assert not log_lines(faults, "engine_started", label="leaver")  # no step of it was run
    assert_still_serving(faults, NORMAL)
    figures.add("4 faults", "disconnected while queued", "skipped, 0 steps run")


def test_a_client_that_disconnects_while_running_stops_the_generation(
    faults: ServiceProcess, figures: FigureBook
) -> None:
    steps = 100  # 5 s of work if nobody stopped it
    leaver = _open_generation(faults, "running-leaver", steps, "fault-running-leaver")
    # Some work to stop: wait for the third step rather than for a guessed time.
    wait_for_log(faults, "engine_step", label="running-leaver", steps_done=3)
    hung_up = time.monotonic()
    # Read after taking the time: at least every step done by then is in the log.
    done_at_hang_up = max(
        line["steps_done"] for line in log_lines(faults, "engine_step", label="running-leaver")
    )
    leaver.close()
    stopped = wait_for_log(faults, "engine_stopped", label="running-leaver")
    stop_seconds = time.monotonic() - hung_up
    assert stopped["reason"] == "JobCancelledError"
    # It stops at its next step: the steps done by the hang-up, those that fit in the time the
    # server took to notice, and the one under way; never the rest of the 100.
    assert done_at_hang_up <= stopped["steps_done"]
    assert stopped["steps_done"] <= done_at_hang_up + math.ceil(stop_seconds / STEP) + 1
    line = wait_for_log(faults, "job_stopped", request_id="fault-running-leaver")
    assert line["reason"] == "JobCancelledError"
    assert_still_serving(faults, NORMAL)
    figures.add(
        "4 faults",
        "disconnected while running",
        f"stopped after {stopped['steps_done']}/{steps} steps, "
        f"{stop_seconds * 1000:.0f} ms after the hang-up (step = {STEP * 1000:.0f} ms)",
    )


@pytest.mark.parametrize("path", ["/generate", "/v1/images/generations"])
def test_a_client_that_hangs_up_mid_stream_stops_the_generation(
    faults: ServiceProcess, figures: FigureBook, path: str
) -> None:
    steps = 100  # 5 s of work if nobody stopped it
    label = f"stream-leaver{path.replace('/', '-')}"
    body = {"prompt": label, "num_inference_steps": steps, "image_size": 256}
    if path.startswith("/v1"):
        body = {"prompt": label, "num_inference_steps": steps, "size": "256x256", "stream": True}
    with (
        faults.client(timeout=30) as client,
        client.stream("POST", path, json=body, headers={"Accept": "text/event-stream"}) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        # The native stream reports every step: hang up after the third. The OpenAI stream
        # sends nothing until a preview, so hang up once the engine has started.
        if path == "/generate":
            seen = 0
            for line in response.iter_lines():
                seen += line == "event: progress"
                if seen == 3:
                    break
        else:
            wait_for_log(faults, "engine_started", label=label)
        hung_up = time.monotonic()
    stopped = wait_for_log(faults, "engine_stopped", label=label)
    stop_seconds = time.monotonic() - hung_up
    assert stopped["reason"] == "JobCancelledError"
    # It stops at its next step: no more steps than had been reported, plus those that fit in
    # the time the server took to notice, plus the one under way.
    reported = 3 if path == "/generate" else 0
    assert stopped["steps_done"] <= reported + math.ceil(stop_seconds / STEP) + 1
    with faults.client() as client:
        wait_until(lambda: client.get("/health").json()["running"] == 0)
    assert_still_serving(faults, NORMAL)
    figures.add(
        "4 faults",
        f"hung up mid-stream ({path})",
        f"stopped after {stopped['steps_done']}/{steps} steps, "
        f"{stop_seconds * 1000:.0f} ms after the hang-up",
    )


DEADLINE = 1.0


@pytest.fixture(scope="module")
def short_deadline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    directory = tmp_path_factory.mktemp("deadline")
    env = {
        "FAKE_STEP_SECONDS": str(STEP),
        "FAKE_STALL_GATE": str(directory / "release-stall"),
        "OVIS_REQUEST_TIMEOUT": str(DEADLINE),
    }
    with run_service(directory, env=env, command=FAULT_COMMAND) as svc:
        yield svc


def test_a_running_job_that_outlives_its_deadline_is_stopped_with_504(
    short_deadline: ServiceProcess,
) -> None:
    started = time.monotonic()
    response = _generate(short_deadline, "long", 100, "fault-deadline")  # 5 s of steps
    elapsed = time.monotonic() - started
    assert response.status_code == 504
    assert elapsed < 4.0  # the 1 s deadline and a step, not the 5 s of work
    stopped = wait_for_log(short_deadline, "engine_stopped", label="long")
    assert stopped["reason"] == "DeadlineExceededError"
    assert stopped["steps_done"] < 100
    assert wait_for_log(short_deadline, "job_stopped", request_id="fault-deadline")
    assert_still_serving(short_deadline, NORMAL)


def test_a_job_whose_deadline_passes_while_queued_is_never_started(
    short_deadline: ServiceProcess,
) -> None:
    # `stall` blocks the worker in one step that cannot be interrupted until the test opens
    # its gate; the job behind it is queued, and the gate opens only once its deadline passed.
    results: dict[str, httpx.Response] = {}

    def run(label: str, request_id: str) -> None:
        results[label] = _generate(short_deadline, label, 2, request_id)

    stall = threading.Thread(target=run, args=("stall", "fault-stall"))
    stall.start()
    wait_for_log(short_deadline, "engine_started", label="stall")
    behind = threading.Thread(target=run, args=("behind-stall", "fault-behind-stall"))
    behind.start()
    with short_deadline.client() as client:
        wait_until(lambda: client.get("/health").json()["queue_depth"] == 1)
    # It was queued before this point, so its deadline is at most DEADLINE from now; waiting
    # longer can only make the outcome more certain.
    time.sleep(DEADLINE + 0.2)
    (short_deadline.log_path.parent / "release-stall").touch()
    behind.join(timeout=30)
    stall.join(timeout=30)
    assert not behind.is_alive()
    assert not stall.is_alive()
    assert results["behind-stall"].status_code == 504
    assert results["stall"].status_code == 504  # it overran its own deadline too
    skipped = wait_for_log(short_deadline, "job_skipped", request_id="fault-behind-stall")
    assert skipped["reason"] == "deadline_passed"
    assert not log_lines(short_deadline, "engine_started", label="behind-stall")
    assert_still_serving(short_deadline, NORMAL)


def test_a_dead_inference_thread_fails_its_jobs_and_ends_the_process_non_zero(
    tmp_path: Path, figures: FigureBook
) -> None:
    """The engine's OOM recovery raises, as `torch.cuda.empty_cache()` does once the CUDA
    context is poisoned. That is outside the per-job guard, so the thread dies; the process
    must not limp on, but fail its jobs and exit non-zero so that a restart policy acts."""
    env = {"FAKE_STEP_SECONDS": str(STEP)}
    with run_service(tmp_path, env=env, command=FAULT_COMMAND) as service:
        results: dict[str, httpx.Response] = {}
        ahead = threading.Thread(
            target=lambda: results.update(ahead=_generate(service, "ahead", 20, "fault-ahead"))
        )
        ahead.start()
        wait_for_log(service, "engine_started", label="ahead")
        queued = threading.Thread(
            target=lambda: results.update(poison=_generate(service, "poison", 2, "fault-poison"))
        )
        queued.start()
        behind = threading.Thread(
            target=lambda: results.update(behind=_generate(service, "behind", 2, "fault-behind"))
        )
        with service.client() as client:
            wait_until(lambda: client.get("/health").json()["queue_depth"] == 1)
        behind.start()
        for thread in (ahead, queued, behind):
            thread.join(timeout=60)
        exit_code = service.process.wait(timeout=60)
    assert results["ahead"].status_code == 200
    assert results["poison"].status_code == 503
    assert results["poison"].json()["detail"].startswith("the inference thread died")
    # `behind` was queued when the thread died (503), or arrived after (503, or refused).
    assert results["behind"].status_code == 503
    assert exit_code == 1
    died = log_lines(service, "inference_thread_died")
    assert len(died) == 1
    assert CUDA_POISONED in died[0]["exception"]
    assert log_lines(service, "stopping_server", reason="inference worker dead")
    figures.add("4 faults", "inference thread killed", f"jobs answered 503, exit code {exit_code}")


def test_a_dead_inference_thread_turns_health_503() -> None:
    """In-process (no server that exits), so that /health can be read after the death."""
    settings = load_settings({"OVIS_MODEL": "fault", "OVIS_WARMUP": "false"})
    app = create_app(settings, engine=FaultEngine(step_seconds=0.0, stall_seconds=0.0))
    with TestClient(app) as client:
        wait_until(lambda: client.get("/health").status_code == 200)
        response = client.post("/generate", json={"prompt": "poison", "num_inference_steps": 1})
        assert response.status_code == 503
        health = client.get("/health")
        assert health.status_code == 503
        assert health.json()["status"] == "dead"
        assert health.json()["model_loaded"] is False
        assert client.post("/generate", json=NORMAL).status_code == 503
