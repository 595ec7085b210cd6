"""Which devices get inference threads, on fake CUDA counts and free-memory figures."""

from typing import Any

import pytest
import torch

from ovis_service.config import Settings, SettingsError
from ovis_service.pipeline.device import copies_on, plan_threads, requested_devices
from ovis_service.pipeline.memory import GIB

CPU, CUDA0, CUDA1 = torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1)


def plan(cuda: int = 0, free_gib: float = 80.0, **overrides: Any) -> list[torch.device]:
    return plan_threads(
        Settings(**overrides),
        cuda_count=lambda: cuda,
        free_bytes=lambda _device: int(free_gib * GIB),
    )


def test_auto_is_every_visible_gpu_and_workers_multiply_them() -> None:
    assert plan(cuda=2) == [CUDA0, CUDA1]
    assert plan(cuda=2, workers=2, max_image_size=1024) == [CUDA0, CUDA0, CUDA1, CUDA1]


def test_without_cuda_auto_is_the_cpu_for_tiny_and_a_refusal_for_the_real_model() -> None:
    assert plan(model="tiny") == [CPU]
    with pytest.raises(SettingsError, match="no CUDA device found"):
        plan()


def test_a_listed_device_may_repeat_and_the_cpu_has_no_memory_budget() -> None:
    assert plan(model="tiny", devices="cpu,cpu", workers=2) == [CPU] * 4


def test_ovis_device_is_a_synonym_for_one_device() -> None:
    assert plan(cuda=2, device="cuda:1") == [CUDA1]
    assert requested_devices("cuda:1", "cuda:1") == ["cuda:1"]
    with pytest.raises(SettingsError, match="OVIS_DEVICE=cuda:0 and OVIS_DEVICES=cuda:1 disagree"):
        requested_devices("cuda:0", "cuda:1")


def test_a_gpu_that_is_not_there_is_named() -> None:
    with pytest.raises(SettingsError, match="OVIS_DEVICES lists cuda:2, but 2 CUDA device"):
        plan(cuda=2, devices="cuda:0,cuda:2")
    with pytest.raises(SettingsError, match="OVIS_DEVICES lists cuda, but 0 CUDA device"):
        plan(devices="cuda")


def test_copies_that_do_not_fit_a_gpu_are_refused_naming_both_settings() -> None:
    # Ovis-Image-7B is about 17 GiB in bf16; with 1024x1024 headroom one copy needs ~20.6 GiB.
    assert plan(cuda=1, free_gib=78.5, workers=3, max_image_size=1024) == [CUDA0] * 3
    with pytest.raises(SettingsError) as refused:
        plan(cuda=1, free_gib=78.5, workers=4, max_image_size=1024)
    message = str(refused.value)
    assert "OVIS_WORKERS=4" in message
    assert "OVIS_DEVICES=auto" in message
    assert "4 copies of the model on cuda:0" in message
    assert "78.5 GiB to give (OVIS_GPU_MEMORY, or what is free when it is unset)" in message
    # Listing a GPU twice counts as two copies on it, just like two workers.
    with pytest.raises(SettingsError, match="2 copies of the model on cuda:0"):
        plan(cuda=2, free_gib=30, devices="cuda:0,cuda:0,cuda:1")


def test_one_copy_always_starts_since_offload_makes_it_fit() -> None:
    assert plan(cuda=1, free_gib=11.4) == [CUDA0]


def test_copies_on_one_gpu_share_its_budget() -> None:
    """The fit check plans with the figure it is given (OVIS_GPU_MEMORY, or what is free), and
    the copies on one device share it."""
    settings = Settings(workers=2, max_image_size=1024, offload="encoder")
    assert copies_on(settings, CUDA0, cuda_count=lambda: 2) == 2
    assert copies_on(Settings(devices="cuda:0,cuda:0,cuda:1"), CUDA0, cuda_count=lambda: 2) == 2
    assert copies_on(Settings(devices="cuda:0,cuda:0,cuda:1"), CUDA1, cuda_count=lambda: 2) == 1
    # encoder keeps about 14 GiB of weights and 3.5 GiB of headroom per copy.
    assert plan(cuda=1, free_gib=36, **settings_fields(settings)) == [CUDA0] * 2
    with pytest.raises(SettingsError, match="2 copies of the model on cuda:0"):
        plan(cuda=1, free_gib=34, **settings_fields(settings))


def settings_fields(settings: Settings) -> dict[str, Any]:
    return {"workers": settings.workers, "max_image_size": 1024, "offload": settings.offload}
