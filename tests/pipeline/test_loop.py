"""Our denoising loop against diffusers' own `OvisImagePipeline.__call__` on the tiny model.

When a diffusers upgrade changes how `__call__` makes an image, these tests are what fail.
"""

from dataclasses import dataclass
from typing import Any

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
# Before the VAE no rounding to 8 bits hides a difference. Batching moves the tiny model's final
# latents by about 1e-6; guidance moves them by about 6e-4 (a scale 0.5 higher) to 1e-2 (no
# negative prompt, or guidance off), so a guidance bug lands far above this bound.
LATENT_TOLERANCE = 1e-4


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


class LatentsSpy:
    """Stands in for the VAE's `decode` and keeps the latents it was last given: both the
    pipeline's `__call__` and our loop end there, so their outputs can be compared before the
    8-bit rounding."""

    def __init__(self, pipe: OvisImagePipeline) -> None:
        self._decode = pipe.vae.decode
        self.last: torch.Tensor | None = None
        pipe.vae.decode = self

    def __call__(self, latents: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.last = latents.detach().clone()
        return self._decode(latents, *args, **kwargs)

    def take(self) -> torch.Tensor:
        latents, self.last = self.last, None
        assert latents is not None, "the VAE decoded nothing"
        return latents


@dataclass(frozen=True)
class Run:
    image: np.ndarray  # int16, so that differences cannot wrap around
    latents: torch.Tensor  # what the VAE decoded into `image`


@pytest.fixture(scope="module")
def pipe() -> OvisImagePipeline:
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    LatentsSpy(pipe)
    return pipe


def _latents(pipe: OvisImagePipeline) -> torch.Tensor:
    spy = pipe.vae.decode
    assert isinstance(spy, LatentsSpy)
    return spy.take()


def reference(pipe: OvisImagePipeline, p: GenerationParams) -> Run:
    with torch.inference_mode():
        image = loop.call_pipeline(pipe, p)
    return Run(np.asarray(image, dtype=np.int16), _latents(pipe))


def ours(
    pipe: OvisImagePipeline, p: GenerationParams, hooks: StepHooks | None = None, *, batch: bool
) -> Run:
    with torch.inference_mode():
        image = loop.generate(pipe, p, hooks or StepHooks(stop_check=lambda: None), cfg_batch=batch)
    # A preview decodes too; the final image is the last thing decoded.
    return Run(np.asarray(image, dtype=np.int16), _latents(pipe))


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
    assert got.image.shape == expected.image.shape == (height, width, 3)
    assert int(np.abs(got.image - expected.image).max()) <= TOLERANCE
    # The comparison means something only if the image is not flat.
    assert expected.image.std() > 1
    # Guidance barely moves the tiny model's pixels; its latents show a wrong formula or a
    # dropped negative prompt.
    assert got.latents.shape == expected.latents.shape
    assert float((got.latents - expected.latents).abs().max()) <= LATENT_TOLERANCE


def test_sequential_guidance_is_bit_identical_to_the_call(pipe: OvisImagePipeline) -> None:
    p = params()
    got, expected = ours(pipe, p, batch=False), reference(pipe, p)
    assert np.array_equal(got.image, expected.image)
    assert torch.equal(got.latents, expected.latents)


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
    final = ours(
        pipe, params(num_inference_steps=4, width=384, height=256), hooks, batch=True
    ).image
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
