"""The `auto` memory mode on fake VRAM figures, sized like Ovis-Image-7B in bf16."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ovis_service.config import SettingsError
from ovis_service.pipeline.loop import call_pipeline
from ovis_service.pipeline.memory import (
    GIB,
    WeightsSize,
    activation_headroom,
    check_fit,
    choose_offload,
    estimate_weights,
    place,
    plan_placement,
)
from ovis_service.pipeline.tiny import build_tiny_pipeline
from ovis_service.schemas import GenerationParams

# Transformer 7.37 B params + Qwen3 1.72 B + VAE, in bf16 (two bytes per parameter).
OVIS_WEIGHTS = int((7.37e9 + 1.72e9 + 0.08e9) * 2)
OVIS_LARGEST = int(7.37e9 * 2)
HEADROOM_1024 = activation_headroom(1024)
HEADROOM_DEFAULT = activation_headroom(2048)  # OVIS_MAX_IMAGE_SIZE defaults to 2048


def auto(free_gib: float, headroom: int = HEADROOM_DEFAULT) -> str:
    return choose_offload(
        "auto",
        on_cuda=True,
        free_bytes=int(free_gib * GIB),
        weights_bytes=OVIS_WEIGHTS,
        largest_component_bytes=OVIS_LARGEST,
        headroom_bytes=headroom,
    )


@pytest.mark.parametrize(
    ("card", "free_gib", "expected"),
    [
        ("H100 80 GB", 78.5, "none"),
        ("A100 40 GB", 39.0, "none"),
        ("RTX 4090 24 GB", 22.8, "model"),
        ("RTX 4080 16 GB", 15.2, "sequential"),
        ("RTX 3060 12 GB", 11.4, "sequential"),
    ],
)
def test_auto_picks_by_free_vram(card: str, free_gib: float, expected: str) -> None:
    assert auto(free_gib) == expected, card


def test_larger_images_need_more_headroom() -> None:
    assert activation_headroom(2048) > activation_headroom(1024) > activation_headroom(512)
    # A 24 GB card keeps everything resident when requests stop at 1024x1024 ...
    assert auto(22.8, headroom=HEADROOM_1024) == "none"
    # ... but needs model offload when they may reach 2048x2048.
    assert auto(22.8, headroom=HEADROOM_DEFAULT) == "model"


def test_an_explicit_mode_wins_over_the_measurement() -> None:
    for mode in ("none", "model", "sequential"):
        assert (
            choose_offload(
                mode,
                on_cuda=True,
                free_bytes=0,
                weights_bytes=OVIS_WEIGHTS,
                largest_component_bytes=OVIS_LARGEST,
                headroom_bytes=HEADROOM_1024,
            )
            == mode
        )


def test_the_cpu_never_offloads() -> None:
    assert (
        choose_offload(
            "sequential",
            on_cuda=False,
            free_bytes=0,
            weights_bytes=OVIS_WEIGHTS,
            largest_component_bytes=OVIS_LARGEST,
            headroom_bytes=HEADROOM_1024,
        )
        == "none"
    )


def fit(copies: int, free_gib: float, offload: str = "auto") -> None:
    check_fit(
        device="cuda:0",
        copies=copies,
        free_bytes=int(free_gib * GIB),
        weights=WeightsSize(OVIS_WEIGHTS, OVIS_LARGEST),
        headroom_bytes=HEADROOM_1024,
        offload=offload,
        workers=copies,
        devices="cuda:0",
    )


def test_copies_fit_when_weights_plus_headroom_each_fit_the_free_memory() -> None:
    each_gib = (OVIS_WEIGHTS + HEADROOM_1024) / GIB  # about 20.6 GiB
    fit(3, free_gib=3 * each_gib + 0.1)
    with pytest.raises(SettingsError) as refused:
        fit(3, free_gib=3 * each_gib - 0.1)
    message = str(refused.value)
    assert "OVIS_WORKERS=3 with OVIS_DEVICES=cuda:0 puts 3 copies of the model on cuda:0" in message
    assert f"each needs about {each_gib:.1f} GiB" in message
    assert "Lower OVIS_WORKERS" in message


def test_one_copy_is_left_to_the_memory_mode() -> None:
    fit(1, free_gib=4)  # sequential offload fits a small card; no refusal here


def test_model_offload_copies_keep_only_the_largest_component_resident() -> None:
    each_gib = (OVIS_LARGEST + HEADROOM_1024) / GIB
    fit(2, free_gib=2 * each_gib + 0.1, offload="model")
    with pytest.raises(SettingsError):
        fit(2, free_gib=2 * each_gib + 0.1, offload="none")


def test_weights_are_read_from_safetensors_headers_in_the_requested_dtype(
    tmp_path: Path,
) -> None:
    for component, shape in (("transformer", (64, 32)), ("vae", (16, 8)), ("text_encoder", (8,))):
        (tmp_path / component).mkdir()
        tensors = {"w": torch.zeros(shape, dtype=torch.bfloat16)}
        save_file(tensors, tmp_path / component / "diffusion_pytorch_model.safetensors")
    size = estimate_weights(str(tmp_path), bytes_per_param=4)
    assert size == WeightsSize((64 * 32 + 16 * 8 + 8) * 4, 64 * 32 * 4)
    assert estimate_weights(str(tmp_path / "missing"), 2) is None
    assert estimate_weights("AIDC-AI/Ovis-Image-7B", 2) == WeightsSize(
        (7_370_000_000 + 1_720_000_000 + 84_000_000) * 2, 7_370_000_000 * 2
    )


def test_a_pipeline_is_measured_by_its_modules_and_kept_whole_on_the_cpu() -> None:
    pipe = build_tiny_pipeline().to(dtype=torch.bfloat16)
    module_bytes = [
        sum(p.numel() * 2 for p in module.parameters())
        for module in (pipe.transformer, pipe.text_encoder, pipe.vae)
    ]
    placement = plan_placement(pipe, "sequential", torch.device("cpu"), max_image_size=1024)
    assert placement.offload == "none"
    assert placement.free_bytes == 0
    assert placement.weights == WeightsSize(sum(module_bytes), max(module_bytes))


@pytest.mark.gpu
@pytest.mark.parametrize("offload", ["none", "model", "sequential"])
def test_each_memory_mode_leaves_a_pipeline_that_runs(offload: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cuda = torch.device("cuda")
    pipe = build_tiny_pipeline()
    placement = plan_placement(pipe, offload, cuda, max_image_size=1024)
    assert placement.offload == offload
    assert placement.free_bytes > 0
    place(pipe, placement.offload, cuda)
    assert pipe._execution_device.type == "cuda"
    params = GenerationParams(prompt="a red fox", num_inference_steps=1, width=256, height=256)
    assert call_pipeline(pipe, params).size == (256, 256)
