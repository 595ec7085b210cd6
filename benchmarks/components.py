"""The parts of an image, each timed alone (text encode, VAE decode, one transformer forward at
batch 1 and 2), and the image's FLOPs against the matmul rate measured here: its floor."""

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from diffusers import OvisImagePipeline

from benchmarks import measure
from ovis_service.pipeline import loop
from ovis_service.schemas import GenerationParams


class Parts(NamedTuple):
    seconds: dict[str, float]  # each part, the best of its repeats
    tokens: int  # image and text tokens in one forward
    counted_flops: int  # by FlopCounterMode, in one batch-1 forward
    counted_attention_flops: int  # the part of those in attention kernels


def measure_parts(
    pipe: OvisImagePipeline, params: GenerationParams, device: torch.device, repeats: int
) -> Parts:
    """Each part after one warm-up call, and the FLOPs FlopCounterMode sees in one forward."""
    with torch.inference_mode():
        cond, latents, image_ids = _transformer_inputs(pipe, params, device)
        forward = {batch: _forward(pipe, cond, latents, image_ids, batch) for batch in (1, 2)}

        def encode() -> Any:
            return loop.encode(pipe, params, device)

        def decode() -> Any:
            return loop.decode(pipe, latents[:1], params.width, params.height)

        for warm in (encode, forward[1], forward[2]):
            warm()
        seconds = {
            "text_encode_s": measure.seconds(encode, device, repeats),
            "vae_decode_s": measure.seconds(decode, device, repeats),
            "forward_batch1_s": measure.seconds(forward[1], device, repeats),
            "forward_batch2_s": measure.seconds(forward[2], device, repeats),
        }
        counted, counted_attention = measure.count_flops(forward[1])
    return Parts(seconds, latents.shape[1] + cond.embeds.shape[1], counted, counted_attention)


def _transformer_inputs(
    pipe: OvisImagePipeline, params: GenerationParams, device: torch.device
) -> tuple[loop.Conditioning, torch.Tensor, torch.Tensor]:
    """Prompt embeddings, and noise latents for two images with their position ids."""
    cond = loop.encode(pipe, params, device)
    latents, image_ids = pipe.prepare_latents(
        2,
        pipe.transformer.config.in_channels // 4,
        params.height,
        params.width,
        cond.embeds.dtype,
        device,
        torch.Generator("cpu").manual_seed(0),
    )
    return cond, latents, image_ids


def _forward(
    pipe: OvisImagePipeline,
    cond: loop.Conditioning,
    latents: torch.Tensor,
    image_ids: torch.Tensor,
    batch: int,
) -> Callable[[], Any]:
    """One transformer forward at `batch` 1 (guidance off) or 2 (cond and uncond together)."""
    embeds = torch.cat([cond.embeds] * batch)
    return lambda: pipe.transformer(
        hidden_states=latents[:batch],
        timestep=torch.full((batch,), 0.5, device=latents.device, dtype=latents.dtype),
        encoder_hidden_states=embeds,
        txt_ids=cond.text_ids,
        img_ids=image_ids,
        return_dict=False,
    )


def flops_and_floor(config: Any, parts: Parts, *, steps: int, peak_tflops: float) -> dict[str, Any]:
    """FLOPs per forward and per image of `steps` guided steps, and the floor: that image at
    the measured matmul rate. Attention is counted by hand, since FlopCounterMode does not
    count it on every device."""
    by_hand = measure.attention_flops(
        config.num_attention_heads,
        config.attention_head_dim,
        parts.tokens,
        config.num_layers + config.num_single_layers,
    )
    counted, counted_attention = parts.counted_flops, parts.counted_attention_flops
    per_forward = counted - counted_attention + by_hand
    forward_batch1_s = parts.seconds["forward_batch1_s"]
    per_image = per_forward * 2 * steps  # guidance: cond and uncond every step
    return {
        "tokens": parts.tokens,
        "counted_tflop_per_forward": _sig(counted / 1e12),
        "counted_attention_tflop": _sig(counted_attention / 1e12),
        "attention_by_hand_tflop": _sig(by_hand / 1e12),
        "tflop_per_forward": _sig(per_forward / 1e12),
        "pflop_per_image": _sig(per_image / 1e15),
        "matmul_tflops_measured": _sig(peak_tflops),
        "floor_s_per_image": _sig(per_image / (peak_tflops * 1e12)),
        "forward_batch1_x_floor": _sig(forward_batch1_s / (per_forward / (peak_tflops * 1e12))),
    }


def _sig(value: float) -> float:
    """Four significant digits: the tiny model's FLOPs are a million times the full one's."""
    return float(f"{value:.4g}")
