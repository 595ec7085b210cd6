"""The `ovis-service` command: configuration errors, `.env`, refusal without CUDA, load failures."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support.service import free_port

COMMAND = [sys.executable, "-m", "ovis_service"]


def run(env: dict[str, str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the command in `cwd`, a directory of the test's own: a `.env` there is the test's."""
    base = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OVIS_PORT": str(free_port())}
    return subprocess.run(
        COMMAND,
        cwd=cwd,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_one_line_without_traceback(result: subprocess.CompletedProcess[str], line: str) -> None:
    assert result.stderr.strip().splitlines() == [line]
    assert "Traceback" not in result.stdout + result.stderr


def test_a_bad_setting_stops_startup_naming_the_variable(tmp_path: Path) -> None:
    result = run({"OVIS_QUEUE_SIZE": "zero"}, tmp_path)
    assert result.returncode == 2
    assert "configuration error: OVIS_QUEUE_SIZE: Expected `int`, got 'zero'" in result.stderr


def test_settings_come_from_dotenv_and_the_environment_wins(tmp_path: Path) -> None:
    # Struct order makes msgspec report queue_size before log_level: only if the real
    # environment's valid queue size wins does the error name the file's log level.
    (tmp_path / ".env").write_text("OVIS_QUEUE_SIZE=0\nOVIS_LOG_LEVEL=TRACE\n", encoding="utf-8")
    result = run({"OVIS_QUEUE_SIZE": "2"}, tmp_path)
    assert result.returncode == 2
    env_file = tmp_path / ".env"
    assert result.stderr.strip() == (
        f"ovis-service: configuration error: OVIS_LOG_LEVEL (set in {env_file}): Invalid enum "
        "value 'TRACE'; expected one of: DEBUG, INFO, WARNING, ERROR"
    )


def test_a_missing_model_directory_is_one_line_before_any_gpu_check(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    # No OVIS_DEVICE=cpu: on a machine without CUDA, a GPU complaint would hide the typo.
    result = run({"OVIS_MODEL": str(missing)}, tmp_path)
    assert result.returncode == 1
    assert_one_line_without_traceback(
        result, f"ovis-service: model failed to load: OVIS_MODEL={missing}: no such directory"
    )


def test_a_directory_that_is_no_model_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not weights", encoding="utf-8")
    result = run({"OVIS_MODEL": str(tmp_path)}, tmp_path)
    assert result.returncode == 1
    assert_one_line_without_traceback(
        result,
        f"ovis-service: model failed to load: OVIS_MODEL={tmp_path}: not a diffusers model "
        "(no model_index.json); give a directory written by save_pretrained, or a hub id such "
        "as AIDC-AI/Ovis-Image-7B",
    )


def test_a_hub_id_missing_from_the_cache_offline_is_one_line(tmp_path: Path) -> None:
    result = run({"OVIS_MODEL": "no-such-owner/no-such-model", "HF_HOME": str(tmp_path)}, tmp_path)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(
        "ovis-service: model failed to load: no-such-owner/no-such-model is not in the Hugging "
        f"Face cache ({tmp_path / 'hub'}) and cannot be downloaded (HF_HUB_OFFLINE=1)"
    )


def test_the_real_model_without_cuda_refuses_to_start_with_a_clear_message(
    tmp_path: Path,
) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    # A model that passes the preflight (a pipeline directory) reaches the device check.
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "OvisImagePipeline"}), encoding="utf-8"
    )
    result = run({"OVIS_MODEL": str(tmp_path)}, tmp_path)
    assert result.returncode == 2
    assert "no CUDA device found" in result.stderr
    assert "OVIS_DEVICE=cpu" in result.stderr


def test_a_model_that_fails_while_loading_ends_the_process_in_one_line(tmp_path: Path) -> None:
    # Passes the preflight, then fails inside from_pretrained: no component is there.
    (tmp_path / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "OvisImagePipeline",
                "transformer": ["diffusers", "OvisImageTransformer2DModel"],
            }
        ),
        encoding="utf-8",
    )
    result = run({"OVIS_MODEL": str(tmp_path), "OVIS_DEVICE": "cpu"}, tmp_path)
    assert result.returncode == 1
    assert_one_line_without_traceback(
        result,
        f"ovis-service: model failed to load: {tmp_path}: OSError: Error no file named "
        f"config.json found in directory {tmp_path}.",
    )
    events = [json.loads(line)["event"] for line in result.stdout.splitlines()]
    assert "model_load_failed" in events
    assert "stopping_server" in events
    assert "model_load_traceback" not in events  # DEBUG only


def test_the_traceback_of_a_load_failure_is_there_at_debug(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "OvisImagePipeline", "vae": ["diffusers", "AutoencoderKL"]}),
        encoding="utf-8",
    )
    result = run(
        {"OVIS_MODEL": str(tmp_path), "OVIS_DEVICE": "cpu", "OVIS_LOG_LEVEL": "DEBUG"}, tmp_path
    )
    assert result.returncode == 1
    traces = [
        record["exception"]
        for record in map(json.loads, result.stdout.splitlines())
        if record["event"] == "model_load_traceback"
    ]
    assert any("OSError: Error no file named config.json" in trace for trace in traces)
