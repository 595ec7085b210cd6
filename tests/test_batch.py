"""`ovis-service batch` through its real command line, against a real service process."""

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from ovis_service.imaging import read_metadata
from tests.support.service import FAKE_COMMAND, ServiceProcess, free_port, run_service

BATCH = [sys.executable, "-m", "ovis_service", "batch"]
SMALL = {"image_size": 256, "num_inference_steps": 2}
KEY = "batch-test-key"


def client_env(**extra: str) -> dict[str, str]:
    """The caller's environment without its OVIS_* settings or proxies: loopback only."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("OVIS_") and "proxy" not in key.lower()
    }
    return {**env, **extra}


def batch_command(prompts: Path, out: Path, url: str, *args: str) -> list[str]:
    return [*BATCH, str(prompts), "--out", str(out), "--url", url, *args]


def run_batch(
    prompts: Path, out: Path, url: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        batch_command(prompts, out, url, *args),
        env=env or client_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@contextmanager
def start_batch(prompts: Path, out: Path, url: str) -> Iterator[subprocess.Popen[str]]:
    """A batch running in the background; killed on the way out if a test left it running."""
    with subprocess.Popen(
        batch_command(prompts, out, url),
        env=client_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()


def wait_for_stderr(process: subprocess.Popen[str], text: str, timeout: float = 60) -> str:
    """Read the progress bar until `text` appears; what was read, for the test to keep."""
    assert process.stderr is not None
    seen = b""
    deadline = time.monotonic() + timeout
    while text.encode() not in seen:
        assert time.monotonic() < deadline, seen.decode(errors="replace")
        ready, _, _ = select.select([process.stderr], [], [], 0.1)
        if ready:
            chunk = os.read(process.stderr.fileno(), 4096)
            assert chunk, f"the batch ended early: {seen.decode(errors='replace')}"
            seen += chunk
    return seen.decode(errors="replace")


def write_prompts(path: Path, lines: list[dict[str, Any] | str]) -> Path:
    """Objects become JSON lines; strings go in as they are (blank or broken lines)."""
    text = [line if isinstance(line, str) else json.dumps(line) for line in lines]
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    return path


def records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def completed_prompts(service: ServiceProcess) -> Counter[str]:
    """How many images the service answered with, per prompt."""
    return Counter(
        line["prompt"] for line in service.logs() if line.get("event") == "request_completed"
    )


@pytest.fixture(scope="module")
def service_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("batch-service")


@pytest.fixture(scope="module")
def service(service_dir: Path) -> Iterator[ServiceProcess]:
    """Two inference threads; `held...` prompts wait for the file `release` to appear."""
    env = {
        "FAKE_ENGINES": "2",
        "FAKE_STEP_SECONDS": "0.01",
        "FAKE_HOLD_FILE": str(service_dir / "release"),
        "OVIS_LOG_PROMPTS": "true",
    }
    with run_service(service_dir, env=env, command=FAKE_COMMAND) as started:
        yield started
    (service_dir / "release").touch()  # a failed test must not leave a job holding a thread


@pytest.mark.parametrize(("image_format", "extension"), [("png", "png"), ("jpeg", "jpg")])
def test_every_line_becomes_an_image_named_by_its_line_and_seed(
    service: ServiceProcess, tmp_path: Path, image_format: str, extension: str
) -> None:
    prompts = write_prompts(
        tmp_path / "prompts.jsonl",
        [
            {"prompt": "a red fox", "seed": 42, **SMALL},
            {"prompt": "a lighthouse", **SMALL},
            "",
            {"prompt": "a mountain, drawn", "seed": 7, "width": 256, "height": 512, **SMALL},
            {"prompt": "a boat", **SMALL},
        ],
    )
    out = tmp_path / "out"
    result = run_batch(
        prompts, out, service.base_url, "--concurrency", "3", "--format", image_format
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("done 4, skipped 0, failed 0")
    assert "img/s" in result.stderr  # the progress bar, with its rate
    by_line = {record["line"]: record for record in records(out)}
    assert sorted(by_line) == [1, 2, 4, 5]  # numbered as an editor shows the file
    assert by_line[1]["seed"] == 42
    assert by_line[4]["seed"] == 7
    for number, record in by_line.items():
        assert record["status"] == "ok"
        assert record["file"] == f"{number:06d}-{record['seed']}.{extension}"
        metadata = read_metadata((out / record["file"]).read_bytes())
        assert metadata["seed"] == str(record["seed"])
        assert metadata["prompt"] == record["prompt"]
    assert read_metadata((out / by_line[4]["file"]).read_bytes())["height"] == "512"
    assert sorted(path.name for path in out.iterdir()) == sorted(
        [*(record["file"] for record in by_line.values()), "results.jsonl"]
    )


def test_bad_lines_fail_alone_are_listed_and_are_retried_once_fixed(
    service: ServiceProcess, tmp_path: Path
) -> None:
    lines: list[dict[str, Any] | str] = [
        {"prompt": "good one", **SMALL},
        {"prompt": "no steps", "image_size": 256, "num_inference_steps": 0},
        '{"prompt": "cut short", ',
        {"prompt": "good two", **SMALL},
    ]
    prompts = write_prompts(tmp_path / "prompts.jsonl", lines)
    out = tmp_path / "out"
    result = run_batch(prompts, out, service.base_url)

    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        f"done 2, skipped 0, failed 2 (results in {out / 'results.jsonl'})",
        "failed lines:",
        "  line 2: HTTP 422: num_inference_steps: Expected int >= 1",
        "  line 3: not valid JSON: Expecting property name enclosed in double quotes (column 25)",
    ]
    failed = {record["line"]: record for record in records(out) if record["status"] != "ok"}
    assert failed[2]["http_status"] == 422
    assert failed[3]["http_status"] is None
    assert len(list(out.glob("*.png"))) == 2

    # Fixed lines are sent again; the two done ones are not.
    lines[1] = {"prompt": "no steps", **SMALL}
    lines[2] = {"prompt": "cut short", **SMALL}
    write_prompts(prompts, lines)
    again = run_batch(prompts, out, service.base_url)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.startswith("done 2, skipped 2, failed 0")
    assert completed_prompts(service)["good one"] == 1
    assert len(list(out.glob("*.png"))) == 4


def test_a_rerun_redoes_a_line_whose_image_is_gone_or_whose_text_changed(
    service: ServiceProcess, tmp_path: Path
) -> None:
    lines: list[dict[str, Any] | str] = [
        {"prompt": f"rerun {n}", "seed": n, **SMALL} for n in range(4)
    ]
    prompts = write_prompts(tmp_path / "prompts.jsonl", lines)
    out = tmp_path / "out"
    assert run_batch(prompts, out, service.base_url).returncode == 0
    (out / "000002-1.png").unlink()
    lines[2] = {"prompt": "rerun 2, edited", "seed": 2, **SMALL}
    write_prompts(prompts, lines)

    again = run_batch(prompts, out, service.base_url)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.startswith("done 2, skipped 2, failed 0")
    redone = records(out)[4:]  # appended after the first run's four
    assert sorted(record["line"] for record in redone) == [2, 3]
    assert {record["prompt"] for record in redone} == {"rerun 1", "rerun 2, edited"}
    done = completed_prompts(service)
    assert [done[f"rerun {n}"] for n in range(4)] == [1, 2, 1, 1]


def test_an_interrupted_run_resumes_without_doing_anything_twice(
    service: ServiceProcess, service_dir: Path, tmp_path: Path
) -> None:
    # Three quick lines, then lines the service holds until `release` exists: when the quick
    # ones are recorded, the held ones are certainly in flight, and the interrupt catches them.
    quick = [{"prompt": f"quick {n}", **SMALL} for n in range(3)]
    held = [{"prompt": f"held {n}", **SMALL} for n in range(4)]
    prompts = write_prompts(tmp_path / "prompts.jsonl", [*quick, *held])
    out = tmp_path / "out"
    try:
        with start_batch(prompts, out, service.base_url) as process:
            deadline = time.monotonic() + 60
            results = out / "results.jsonl"
            while not results.exists() or results.read_text().count("\n") < 3:
                assert time.monotonic() < deadline, "the quick lines never finished"
                assert process.poll() is None, process.communicate()
                time.sleep(0.05)
            process.send_signal(signal.SIGINT)
            stdout, stderr = process.communicate(timeout=30)
    finally:
        (service_dir / "release").touch()

    assert process.returncode == 130, stdout + stderr
    assert stdout.startswith("interrupted: done 3, skipped 0, failed 0, not finished 4")
    first = records(out)
    assert sorted(record["line"] for record in first) == [1, 2, 3]  # none of those in flight
    assert sorted(path.name for path in out.iterdir()) == sorted(
        [*(record["file"] for record in first), "results.jsonl"]
    )  # and no half image

    resumed = run_batch(prompts, out, service.base_url)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert resumed.stdout.startswith("done 4, skipped 3, failed 0")
    every = records(out)
    assert sorted(record["line"] for record in every) == list(range(1, 8))
    assert {record["status"] for record in every} == {"ok"}
    assert len(list(out.glob("*.png"))) == 7
    # The service made each image once: the held jobs it was running at the interrupt were
    # stopped when the connection closed, not finished for nobody.
    done = completed_prompts(service)
    assert [done[line["prompt"]] for line in [*quick, *held]] == [1] * 7


def test_a_full_queue_is_ridden_out_by_waiting_as_retry_after_says(tmp_path: Path) -> None:
    # One thread and one queue place: of four requests in flight, two are refused with 503.
    env = {"FAKE_STEP_SECONDS": "0.05", "OVIS_QUEUE_SIZE": "1"}
    with run_service(tmp_path, env=env, command=FAKE_COMMAND) as small:
        prompts = write_prompts(
            tmp_path / "prompts.jsonl",
            [
                {"prompt": f"busy {n}", "image_size": 256, "num_inference_steps": 4}
                for n in range(6)
            ],
        )
        out = tmp_path / "out"
        started = time.monotonic()
        result = run_batch(prompts, out, small.base_url, "--concurrency", "4")
        elapsed = time.monotonic() - started
        refused = [
            line
            for line in small.logs()
            if line.get("event") == "request_rejected" and line.get("status") == 503
        ]

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("done 6, skipped 0, failed 0")
    assert len(list(out.glob("*.png"))) == 6
    assert refused, "the queue never filled, so nothing was tested"
    # Retry-After is at least a second: a client that honours it comes back a few times per
    # second at most, where one that does not would be refused hundreds of times.
    assert len(refused) <= 4 * (elapsed + 1)


@pytest.fixture(scope="module")
def keyed_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    directory = tmp_path_factory.mktemp("keyed-service")
    with run_service(directory, env={"OVIS_API_KEY": KEY}, command=FAKE_COMMAND) as started:
        yield started


@pytest.mark.parametrize(
    ("args", "env"),
    [(["--api-key", KEY], {}), ([], {"OVIS_API_KEY": KEY})],
    ids=["flag", "environment"],
)
def test_the_api_key_is_sent_as_a_bearer_token(
    keyed_service: ServiceProcess, tmp_path: Path, args: list[str], env: dict[str, str]
) -> None:
    prompts = write_prompts(tmp_path / "prompts.jsonl", [{"prompt": "a key", **SMALL}] * 2)
    result = run_batch(
        prompts, tmp_path / "out", keyed_service.base_url, *args, env=client_env(**env)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("done 2, skipped 0, failed 0")


@pytest.mark.parametrize(
    ("args", "detail"),
    [(["--api-key", "wrong"], "invalid API key"), ([], "missing API key")],
    ids=["wrong", "missing"],
)
def test_without_the_right_key_every_line_fails_saying_why(
    keyed_service: ServiceProcess, tmp_path: Path, args: list[str], detail: str
) -> None:
    prompts = write_prompts(tmp_path / "prompts.jsonl", [{"prompt": "a key", **SMALL}] * 3)
    out = tmp_path / "out"
    result = run_batch(prompts, out, keyed_service.base_url, *args)
    assert result.returncode == 1
    failures = [line for line in result.stdout.splitlines() if line.startswith("  line ")]
    assert len(failures) == 3
    for failure in failures:
        assert f"HTTP 401: {detail}" in failure
        assert failure.endswith("(check --api-key or OVIS_API_KEY)")
    assert not list(out.glob("*.png"))


def test_connection_errors_are_retried_until_the_service_is_up(tmp_path: Path) -> None:
    port = free_port()
    prompts = write_prompts(tmp_path / "prompts.jsonl", [{"prompt": "patient", **SMALL}])
    out = tmp_path / "out"
    with start_batch(prompts, out, f"http://127.0.0.1:{port}") as process:
        time.sleep(1.0)  # long enough for the first try to be refused
        assert process.poll() is None, process.communicate()
        # On the port the batch is calling; the batch itself is the readiness check.
        env = {"OVIS_PORT": str(port)}
        with run_service(tmp_path, env=env, command=FAKE_COMMAND, wait_ready=False):
            stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stdout + stderr
    assert stdout.startswith("done 1, skipped 0, failed 0")
    assert "retries=0" not in stderr.rsplit("\r", 1)[-1]


def test_sigterm_stops_a_waiting_run_and_records_nothing(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "prompts.jsonl", [{"prompt": "never sent", **SMALL}])
    out = tmp_path / "out"
    with start_batch(prompts, out, f"http://127.0.0.1:{free_port()}") as process:
        seen = wait_for_stderr(process, "retries=1")  # waiting to retry a refused connection
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
        stderr = seen + stderr
    assert process.returncode == 128 + signal.SIGTERM, stdout + stderr
    assert stdout.startswith("interrupted: done 0, skipped 0, failed 0, not finished 1")
    assert not (out / "results.jsonl").exists()


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "no such file"),
        ("out-is-a-file", "exists and is not a directory"),
        ("bad-url", "--url must start with http:// or https://"),
    ],
)
def test_usage_errors_exit_2_with_one_line(tmp_path: Path, setup: str, message: str) -> None:
    prompts = write_prompts(tmp_path / "prompts.jsonl", [{"prompt": "x"}])
    out = tmp_path / "out"
    url = "http://127.0.0.1:1"
    if setup == "missing":
        prompts = tmp_path / "nowhere.jsonl"
    elif setup == "out-is-a-file":
        out.write_text("")
    else:
        url = "127.0.0.1:4201"
    result = run_batch(prompts, out, url)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("ovis-service batch: ")
    assert message in line
