"""Each speed lever on the tiny model: refused where it cannot run, doing its work where it can,
and (for the lossless ones) giving the default's image. Compile has its own module."""

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.hooks._helpers import TransformerBlockRegistry
from diffusers.models.transformers.transformer_ovis_image import (
    OvisImageSingleTransformerBlock,
    OvisImageTransformerBlock,
)
from PIL import Image

from ovis_service.config import Settings, SettingsError, load_settings
from ovis_service.engine import StepHooks
from ovis_service.pipeline import DiffusersEngine
from ovis_service.pipeline.levers import register_ovis_blocks
from ovis_service.schemas import GenerationParams
from tests.support.service import ServiceProcess, run_service

TOLERANCE = 1  # one 8-bit level
NO_HOOKS = StepHooks(stop_check=lambda: None)
# (width, height, steps, cfg_scale): square, both non-square shapes, guidance off.
REQUESTS = [(256, 256, 3, 4.0), (384, 256, 2, 4.0), (256, 512, 2, 4.0), (256, 256, 2, 1.0)]


def params(
    width: int = 256, height: int = 256, steps: int = 3, cfg: float = 4.0
) -> GenerationParams:
    return GenerationParams(
        prompt="a bowl of ramen",
        num_inference_steps=steps,
        cfg_scale=cfg,
        width=width,
        height=height,
        seed=5,
    )


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def default_engine() -> Iterator[DiffusersEngine]:
    engine = DiffusersEngine(Settings(model="tiny"))
    engine.load()
    yield engine
    engine.release()


@pytest.fixture(scope="module")
def default_images(
    default_engine: DiffusersEngine,
) -> dict[tuple[int, int, int, float], np.ndarray]:
    return {
        case: pixels(default_engine.generate(params(*case), NO_HOOKS).image) for case in REQUESTS
    }


# -- refused at startup, with the setting named ---------------------------------------------


def test_fp8_is_refused_without_a_capable_gpu() -> None:
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("this machine has an fp8-capable GPU")
    with pytest.raises(SettingsError, match=r"OVIS_QUANTIZE=fp8 needs an NVIDIA GPU .* 8\.9"):
        DiffusersEngine(Settings(model="tiny", device="cpu", quantize="fp8"))


def test_an_attention_backend_this_device_cannot_run_is_refused() -> None:
    with pytest.raises(SettingsError, match="OVIS_ATTENTION=cudnn cannot run on cpu"):
        DiffusersEngine(Settings(model="tiny", device="cpu", attention="cudnn"))


def test_an_attention_backend_whose_package_is_missing_is_refused() -> None:
    with pytest.raises(
        SettingsError, match=r"OVIS_ATTENTION=sage cannot run on cpu.*sageattention"
    ):
        DiffusersEngine(Settings(model="tiny", device="cpu", attention="sage"))


def test_first_block_cache_with_compile_is_refused() -> None:
    with pytest.raises(SettingsError, match="OVIS_STEP_CACHE=first_block cannot be combined"):
        DiffusersEngine(Settings(model="tiny", compile="regional", step_cache="first_block"))


def test_a_lever_value_that_does_not_exist_names_the_variable() -> None:
    with pytest.raises(SettingsError, match="OVIS_STEP_CACHE"):
        load_settings({"OVIS_STEP_CACHE": "teacache"})
    with pytest.raises(SettingsError, match="OVIS_STEP_CACHE_THRESHOLD"):
        load_settings({"OVIS_STEP_CACHE_THRESHOLD": "0"})
    settings = load_settings({"OVIS_CFG_BATCH": "false", "OVIS_COMPILE": "regional"})
    assert (settings.cfg_batch, settings.compile) == (False, "regional")


def test_the_ovis_blocks_are_registered_by_our_code() -> None:
    register_ovis_blocks()
    for block in (OvisImageTransformerBlock, OvisImageSingleTransformerBlock):
        metadata = TransformerBlockRegistry.get(block)
        # Both blocks return (encoder_hidden_states, hidden_states).
        assert (
            metadata.return_encoder_hidden_states_index,
            metadata.return_hidden_states_index,
        ) == (
            0,
            1,
        )


# -- the caches do less work -------------------------------------------------------------------


def attention_forwards(engine: DiffusersEngine, steps: int) -> int:
    """How often the single-stream block's attention really ran: a cache that predicts the
    attention output, or skips the block, skips this projection too."""
    pipe = engine.pipeline
    assert pipe is not None
    calls = 0

    def count(*_args: object) -> None:
        nonlocal calls
        calls += 1

    handle = pipe.transformer.single_transformer_blocks[0].attn.to_q.register_forward_hook(count)
    try:
        image = engine.generate(params(steps=steps), NO_HOOKS).image
    finally:
        handle.remove()
    assert image.size == (256, 256)
    return calls


@pytest.mark.parametrize(
    "settings",
    [
        Settings(model="tiny", step_cache="taylorseer"),
        # The tiny model's random weights change a lot between steps; a loose threshold makes
        # the cache skip some of them.
        Settings(model="tiny", step_cache="first_block", step_cache_threshold=1.0),
    ],
    ids=["taylorseer", "first_block"],
)
def test_a_step_cache_skips_attention_forwards(
    settings: Settings, default_engine: DiffusersEngine
) -> None:
    steps = 12
    full = attention_forwards(default_engine, steps)
    assert full == steps  # one single-stream block, one batched forward per step
    engine = DiffusersEngine(settings)
    engine.load()
    cached = attention_forwards(engine, steps)
    assert 0 < cached < full
    # The cache's state is reset between runs: the next run does the same work again.
    assert attention_forwards(engine, steps) == cached
    engine.release()


# -- the service starts with each lever and serves several sizes ------------------------------


SERVICE_LEVERS = {
    "cfg-sequential": ({"OVIS_CFG_BATCH": "false"}, {"cfg_batch": "false"}, True),
    "attention-math": ({"OVIS_ATTENTION": "math"}, {"attention": "math"}, True),
    "taylorseer": ({"OVIS_STEP_CACHE": "taylorseer"}, {"step_cache": "taylorseer"}, False),
    "first-block": (
        {"OVIS_STEP_CACHE": "first_block", "OVIS_STEP_CACHE_THRESHOLD": "0.2"},
        {"step_cache": "first_block(threshold=0.2)"},
        False,
    ),
}


def post_image(service: ServiceProcess, case: tuple[int, int, int, float]) -> np.ndarray:
    width, height, steps, cfg = case
    with service.client() as client:
        response = client.post(
            "/generate",
            json={
                "prompt": "a bowl of ramen",
                "width": width,
                "height": height,
                "num_inference_steps": steps,
                "cfg_scale": cfg,
                "seed": 5,
            },
        )
    assert response.status_code == 200, response.text
    return pixels(Image.open(io.BytesIO(response.content)))


@pytest.mark.parametrize("lever", list(SERVICE_LEVERS))
def test_the_service_runs_with_the_lever(
    lever: str,
    tmp_path: Path,
    default_images: dict[tuple[int, int, int, float], np.ndarray],
) -> None:
    env, shown, lossless = SERVICE_LEVERS[lever]
    with run_service(tmp_path, env=env, ready_timeout=300) as service:
        for case in REQUESTS:
            got = post_image(service, case)
            assert got.shape == (case[1], case[0], 3)
            if lossless:
                assert int(np.abs(got - default_images[case]).max()) <= TOLERANCE
        started = [line for line in service.logs() if line.get("event") == "levers_in_force"]
    assert started, "the startup log names the levers in force"
    assert shown.items() <= started[0].items()
