"""The denoising loop: prepare, loop over timesteps, guide, step, decode.

It reuses the pipeline's own components and helpers (prompt encoding, latent packing, timestep
shift, scheduler, VAE, post-processing) and replaces only `OvisImagePipeline.__call__`, so that
the service decides how each step runs: cond and uncond as one batch, hooks for cancellation,
progress and previews. `tests/pipeline/test_loop.py` holds it to `__call__`'s images.
"""

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import OvisImagePipeline
from diffusers.pipelines.ovis_image.pipeline_ovis_image import calculate_shift, retrieve_timesteps
from PIL import Image

from ovis_service.engine import StepHooks
from ovis_service.schemas import GenerationParams

MAX_SEQUENCE_LENGTH = 256  # the pipeline's hard limit on prompt tokens


@dataclass(frozen=True)
class Conditioning:
    """Text embeddings for one run; with guidance, uncond is row 0 and cond row 1 when batched."""

    embeds: torch.Tensor
    text_ids: torch.Tensor
    negative_embeds: torch.Tensor | None
    guidance: float | None  # None: guidance off (scale <= 1), one forward per step


def encode(pipe: OvisImagePipeline, params: GenerationParams, device: torch.device) -> Conditioning:
    guided = params.cfg_scale > 1
    embeds, negative, text_ids, _ = pipe.encode_prompt(
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        do_classifier_free_guidance=guided,
        device=device,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
    )
    # Both prompts are padded to the same length, so their text ids are the same tensor.
    return Conditioning(embeds, text_ids, negative, params.cfg_scale if guided else None)


def schedule(
    pipe: OvisImagePipeline, steps: int, image_tokens: int, device: torch.device
) -> torch.Tensor:
    """The shifted flow-matching timesteps, exactly as `__call__` sets them."""
    config = pipe.scheduler.config
    sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
    mu = calculate_shift(
        image_tokens,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    timesteps, _ = retrieve_timesteps(pipe.scheduler, steps, device, sigmas=sigmas, mu=mu)
    pipe.scheduler.set_begin_index(0)
    return timesteps  # type: ignore[no-any-return]


class Denoiser:
    """Predicts the guided velocity for one step: two forwards, or one of batch two."""

    def __init__(
        self,
        pipe: OvisImagePipeline,
        cond: Conditioning,
        image_ids: torch.Tensor,
        *,
        cfg_batch: bool,
    ) -> None:
        self._transformer = pipe.transformer
        self._cond = cond
        self._image_ids = image_ids
        self._batched = cfg_batch and cond.negative_embeds is not None
        if self._batched:
            assert cond.negative_embeds is not None
            self._both_embeds = torch.cat([cond.negative_embeds, cond.embeds])

    def __call__(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        guidance, negative = self._cond.guidance, self._cond.negative_embeds
        if self._batched and guidance is not None:
            with self._transformer.cache_context("cond_uncond"):
                both = self._forward(torch.cat([latents, latents]), t, self._both_embeds)
            uncond, cond = both.chunk(2)
            return uncond + guidance * (cond - uncond)
        with self._transformer.cache_context("cond"):
            cond = self._forward(latents, t, self._cond.embeds)
        if guidance is None or negative is None:
            return cond
        with self._transformer.cache_context("uncond"):
            uncond = self._forward(latents, t, negative)
        return uncond + guidance * (cond - uncond)

    def _forward(
        self, latents: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor
    ) -> torch.Tensor:
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        output = self._transformer(
            hidden_states=latents,
            timestep=timestep / 1000,
            encoder_hidden_states=embeds,
            txt_ids=self._cond.text_ids,
            img_ids=self._image_ids,
            return_dict=False,
        )
        return output[0]  # type: ignore[no-any-return]


def decode(pipe: OvisImagePipeline, packed: torch.Tensor, width: int, height: int) -> Image.Image:
    latents = pipe._unpack_latents(packed, height, width, pipe.vae_scale_factor)
    latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    pixels = pipe.vae.decode(latents, return_dict=False)[0]
    image: Image.Image = pipe.image_processor.postprocess(pixels, output_type="pil")[0]
    return image


def generate(
    pipe: OvisImagePipeline,
    params: GenerationParams,
    hooks: StepHooks,
    *,
    cfg_batch: bool,
) -> Image.Image:
    """One image, the way `pipe(...)` makes it with the same seed, plus the step hooks."""
    device = pipe._execution_device
    cond = encode(pipe, params, device)
    # A CPU generator makes a seed mean the same noise on every GPU model and driver.
    generator = torch.Generator("cpu").manual_seed(params.seed)
    latents, image_ids = pipe.prepare_latents(
        1,
        pipe.transformer.config.in_channels // 4,
        params.height,
        params.width,
        cond.embeds.dtype,
        device,
        generator,
    )
    timesteps = schedule(pipe, params.num_inference_steps, latents.shape[1], device)
    denoise = Denoiser(pipe, cond, image_ids, cfg_batch=cfg_batch)
    total = len(timesteps)
    for i, t in enumerate(timesteps):
        velocity = denoise(latents, t)
        preview_wanted = i + 1 in hooks.preview_steps
        if preview_wanted:
            # Flow matching: x_t = (1 - sigma) x0 + sigma noise and v = noise - x0.
            clean_estimate = latents - pipe.scheduler.sigmas[i] * velocity
        latents = pipe.scheduler.step(velocity, t, latents, return_dict=False)[0]
        hooks.stop_check()
        hooks.on_progress(i + 1, total)
        if preview_wanted:
            hooks.on_preview(i + 1, decode(pipe, clean_estimate, params.width, params.height))
    return decode(pipe, latents, params.width, params.height)


def call_pipeline(pipe: OvisImagePipeline, params: GenerationParams) -> Image.Image:
    """The plain `pipe(...)` call this loop replaces, with the same seed and limits: the
    equivalence test's reference and the speed benchmark's baseline."""
    output = pipe(
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        num_inference_steps=params.num_inference_steps,
        guidance_scale=params.cfg_scale,
        width=params.width,
        height=params.height,
        generator=torch.Generator("cpu").manual_seed(params.seed),
        max_sequence_length=MAX_SEQUENCE_LENGTH,
    )
    image: Image.Image = output.images[0]
    return image
