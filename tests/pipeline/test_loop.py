"""Our denoising loop against diffusers' own `OvisImagePipeline.__call__` on the tiny model.

When a diffusers upgrade changes how `__call__` makes an image, these tests are what fail.
"""

import numpy as np
import pytest
import torch
from diffusers import OvisImagePipeline
from PIL import Image

from ovis_service.engine import StepHooks
from ovis_service.errors import JobCancelledError
from ovis_service.pipeline import loop
from ovis_service.pipeline.tiny import build_tiny_pipeline
from ovis_service.schemas import GenerationParams

# One 8-bit level: batching cond and uncond changes float summation order, nothing more.
TOLERANCE = 1


def params(**overrides: object) -> GenerationParams:
    values: dict[str, object] = {
        "prompt": "a lighthouse at dusk",
        "negative_prompt": "blurry",
        "num_inference_steps": 3,
        "cfg_scale": 4.0,
        "width": 256,
        "height": 256,
        "seed": 3,
    }
    values.update(overrides)
    return GenerationParams(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def pipe() -> OvisImagePipeline:
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(pipe: OvisImagePipeline, p: GenerationParams) -> np.ndarray:
    with torch.inference_mode():
        return np.asarray(loop.call_pipeline(pipe, p), dtype=np.int16)


def ours(
    pipe: OvisImagePipeline, p: GenerationParams, hooks: StepHooks | None = None, *, batch: bool
) -> np.ndarray:
    with torch.inference_mode():
        image = loop.generate(pipe, p, hooks or StepHooks(stop_check=lambda: None), cfg_batch=batch)
    return np.asarray(image, dtype=np.int16)


CASES = [
    (256, 256, 1, 4.0),
    (512, 256, 3, 4.0),  # non-square, wide
    (256, 384, 4, 7.5),  # non-square, tall
    (256, 256, 3, 1.0),  # guidance off at exactly 1
    (384, 256, 2, 0.5),  # and below 1
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "{}x{}-{}steps-cfg{}".format(*c))
@pytest.mark.parametrize("batch", [False, True], ids=["cfg-sequential", "cfg-batched"])
def test_the_loop_matches_the_pipelines_call(
    pipe: OvisImagePipeline, case: tuple[int, int, int, float], batch: bool
) -> None:
    width, height, steps, guidance = case
    p = params(width=width, height=height, num_inference_steps=steps, cfg_scale=guidance)
    expected = reference(pipe, p)
    got = ours(pipe, p, batch=batch)
    assert got.shape == expected.shape == (height, width, 3)
    assert int(np.abs(got - expected).max()) <= TOLERANCE
    # The comparison means something only if the image is not flat.
    assert expected.std() > 1


def test_sequential_guidance_is_bit_identical_to_the_call(pipe: OvisImagePipeline) -> None:
    p = params()
    assert np.array_equal(ours(pipe, p, batch=False), reference(pipe, p))


def test_batched_guidance_runs_one_forward_of_batch_two_per_step(pipe: OvisImagePipeline) -> None:
    batches: list[int] = []
    hook = pipe.transformer.register_forward_hook(
        lambda _module, args, kwargs, _out: batches.append(kwargs["hidden_states"].shape[0]),
        with_kwargs=True,
    )
    try:
        ours(pipe, params(num_inference_steps=3), batch=True)
        assert batches == [2, 2, 2]
        batches.clear()
        ours(pipe, params(num_inference_steps=3), batch=False)
        assert batches == [1] * 6
        batches.clear()
        ours(pipe, params(num_inference_steps=3, cfg_scale=1.0), batch=True)
        assert batches == [1, 1, 1]
    finally:
        hook.remove()


def test_hooks_see_every_step_and_previews_only_where_asked(pipe: OvisImagePipeline) -> None:
    progress: list[tuple[int, int]] = []
    previews: list[tuple[int, Image.Image]] = []
    stops = 0

    def stop_check() -> None:
        nonlocal stops
        stops += 1

    hooks = StepHooks(
        stop_check=stop_check,
        on_progress=lambda done, total: progress.append((done, total)),
        preview_steps=frozenset({2, 4}),
        on_preview=lambda done, image: previews.append((done, image)),
    )
    final = ours(pipe, params(num_inference_steps=4, width=384, height=256), hooks, batch=True)
    assert stops == 4
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert [done for done, _ in previews] == [2, 4]
    assert all(image.size == (384, 256) for _, image in previews)
    # The last step's clean estimate is where the final step lands: the same picture.
    last = np.asarray(previews[-1][1], dtype=np.int16)
    assert int(np.abs(last - final).max()) <= TOLERANCE
    # An earlier estimate is still on its way there.
    assert not np.array_equal(np.asarray(previews[0][1], dtype=np.int16), final)


def test_stop_check_raising_ends_the_loop_before_the_next_step(pipe: OvisImagePipeline) -> None:
    forwards = 0

    def count(*_args: object) -> None:
        nonlocal forwards
        forwards += 1

    def stop_after_first() -> None:
        raise JobCancelledError("the client went away")

    hook = pipe.transformer.register_forward_hook(count)
    try:
        with pytest.raises(JobCancelledError):
            ours(
                pipe,
                params(num_inference_steps=20),
                StepHooks(stop_check=stop_after_first),
                batch=True,
            )
    finally:
        hook.remove()
    assert forwards == 1
