"""The diffusers engine on the tiny real OvisImagePipeline (CPU, random weights)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from structlog.testing import capture_logs

from ovis_service.config import Settings, SettingsError
from ovis_service.engine import StepHooks
from ovis_service.errors import JobCancelledError
from ovis_service.pipeline import DiffusersEngine
from ovis_service.pipeline.tiny import build_tiny_pipeline
from ovis_service.schemas import GenerationParams

SIZE = 256


def params(**overrides: object) -> GenerationParams:
    values: dict[str, object] = {
        "prompt": "a red fox in the snow",
        "num_inference_steps": 2,
        "width": SIZE,
        "height": SIZE,
        "seed": 7,
    }
    values.update(overrides)
    return GenerationParams(**values)  # type: ignore[arg-type]


def no_stop() -> None:
    return None


NO_HOOKS = StepHooks(stop_check=no_stop)


@pytest.fixture(scope="module")
def engine() -> DiffusersEngine:
    engine = DiffusersEngine(Settings(model="tiny"))
    info = engine.load()
    assert (info.model, info.device, info.dtype, info.offload) == ("tiny", "cpu", "float32", "none")
    assert info.levers == {
        "cfg_batch": "true",
        "compile": "none",
        "attention": "auto",
        "step_cache": "none",
        "quantize": "none",
    }
    return engine


def pixels(engine: DiffusersEngine, **overrides: object) -> np.ndarray:
    return np.asarray(engine.generate(params(**overrides), NO_HOOKS).image)


def test_the_image_has_the_requested_size(engine: DiffusersEngine) -> None:
    result = engine.generate(params(width=512, height=512), NO_HOOKS)
    assert result.image.size == (512, 512)
    assert result.image.mode == "RGB"
    assert result.prompt_truncated is False


def test_the_same_seed_gives_the_same_pixels_and_another_seed_does_not(
    engine: DiffusersEngine,
) -> None:
    first = pixels(engine, seed=11)
    assert np.array_equal(first, pixels(engine, seed=11))
    assert not np.array_equal(first, pixels(engine, seed=12))


def test_cfg_scale_drives_guidance_scale(engine: DiffusersEngine) -> None:
    """Guidance above 1 runs cond and uncond each step (one forward of batch two, by default),
    and its strength changes the image."""
    pipe = engine.pipeline
    assert pipe is not None
    batches: list[int] = []

    def count(_module: object, args: object, kwargs: dict[str, torch.Tensor], _out: object) -> None:
        batches.append(kwargs["hidden_states"].shape[0])

    hook = pipe.transformer.register_forward_hook(count, with_kwargs=True)
    try:
        guided_low = pixels(engine, cfg_scale=2.0, num_inference_steps=3)
        assert batches == [2, 2, 2]
        batches.clear()
        unguided = pixels(engine, cfg_scale=1.0, num_inference_steps=3)
        assert batches == [1, 1, 1]
        guided_high = pixels(engine, cfg_scale=9.0, num_inference_steps=3)
    finally:
        hook.remove()
    assert not np.array_equal(guided_low, guided_high)
    assert not np.array_equal(unguided, guided_low)


def test_a_prompt_past_256_tokens_is_reported_as_truncated(engine: DiffusersEngine) -> None:
    long_prompt = " ".join(f"word{i}" for i in range(400))
    assert engine.generate(params(prompt=long_prompt), NO_HOOKS).prompt_truncated is True


def test_stop_check_ends_the_run_between_steps(engine: DiffusersEngine) -> None:
    calls = 0

    def stop_after_two() -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise JobCancelledError("the client disconnected")

    with pytest.raises(JobCancelledError):
        engine.generate(params(num_inference_steps=50), StepHooks(stop_check=stop_after_two))
    assert calls == 2


def test_a_local_directory_in_save_pretrained_layout_loads(tmp_path: Path) -> None:
    build_tiny_pipeline().save_pretrained(tmp_path / "model")
    # Without CUDA, anything but the tiny model needs the CPU asked for by name.
    device = "auto" if torch.cuda.is_available() else "cpu"
    engine = DiffusersEngine(Settings(model=str(tmp_path / "model"), device=device))
    engine.load()
    assert engine.generate(params(), NO_HOOKS).image.size == (SIZE, SIZE)
    engine.release()
    assert engine.pipeline is None


def test_the_real_model_without_cuda_refuses_to_start_unless_cpu_is_asked_for() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA, so auto picks it")
    with pytest.raises(SettingsError, match="Set OVIS_DEVICE=cpu"):
        DiffusersEngine(Settings(model="AIDC-AI/Ovis-Image-7B"))
    # Asking for the CPU by name is allowed (nothing is loaded until load()).
    DiffusersEngine(Settings(model="AIDC-AI/Ovis-Image-7B", device="cpu"))


def test_cuda_asked_for_by_name_without_a_device_is_refused() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SettingsError, match="no CUDA device is visible"):
        DiffusersEngine(Settings(model="tiny", device="cuda"))


@pytest.mark.gpu
def test_tiny_model_runs_in_bf16_on_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    engine = DiffusersEngine(Settings(model="tiny", device="cuda"))
    info = engine.load()
    assert info.dtype == "bfloat16"
    assert engine.generate(params(), NO_HOOKS).image.size == (SIZE, SIZE)
    engine.release()


def test_an_explicit_device_overrides_the_setting() -> None:
    """A worker pool builds one engine per device from the same settings."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    engine = DiffusersEngine(Settings(model="tiny", device="cuda"), device="cpu")
    assert engine.load().device == "cpu"
    engine.release()
    with pytest.raises(SettingsError, match="OVIS_DEVICE=cuda:1, but no CUDA device"):
        DiffusersEngine(Settings(model="tiny"), device="cuda:1")


def test_on_a_cpu_the_memory_mode_line_says_so_and_a_gpu_setting_is_named() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    engine = DiffusersEngine(Settings(model="tiny", device="cpu", offload="model"))
    with capture_logs() as logs:
        info = engine.load()
    assert info.offload == "none"
    [ignored] = [log for log in logs if log["event"] == "gpu_only_setting_ignored"]
    assert ignored["log_level"] == "warning"
    assert (ignored["setting"], ignored["value"]) == ("OVIS_OFFLOAD", "model")
    [mode] = [log for log in logs if log["event"] == "memory_mode_chosen"]
    assert mode["device"] == "cpu"
    assert mode["chosen"] == "none"
    assert mode["note"].startswith("no GPU")
    assert "free_vram_gib" not in mode
    assert mode["weights_mib"] > 0  # the tiny model's weights, not a rounded-away 0.0 GiB
