"""The `ovis-service` command: configuration errors, refusal without CUDA, load failures."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support.service import REPO_ROOT, free_port

COMMAND = [sys.executable, "-m", "ovis_service"]


def run(env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    base = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OVIS_PORT": str(free_port())}
    return subprocess.run(
        COMMAND,
        cwd=REPO_ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_a_bad_setting_stops_startup_naming_the_variable() -> None:
    result = run({"OVIS_QUEUE_SIZE": "zero"})
    assert result.returncode == 2
    assert "configuration error: OVIS_QUEUE_SIZE: Expected `int`, got `str`" in result.stderr


def test_the_real_model_without_cuda_refuses_to_start_with_a_clear_message() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run({"OVIS_MODEL": "AIDC-AI/Ovis-Image-7B"})
    assert result.returncode == 2
    assert "no CUDA device found" in result.stderr
    assert "OVIS_DEVICE=cpu" in result.stderr


def test_a_model_that_cannot_load_ends_the_process_non_zero(tmp_path: Path) -> None:
    result = run({"OVIS_MODEL": str(tmp_path / "missing"), "OVIS_DEVICE": "cpu"})
    assert result.returncode == 1
    assert '"event": "model_load_failed"' in result.stdout
    assert '"event": "stopping_server"' in result.stdout
