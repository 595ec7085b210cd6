"""Pick a memory mode from the VRAM we measure. Pure arithmetic, so tests feed it fake figures."""

from typing import Literal

OffloadMode = Literal["none", "model", "sequential"]
GIB = 1024**3


def activation_headroom(max_image_size: int) -> int:
    """Room for activations and the VAE decode, which grow with the pixel count.

    An estimate, not a measurement: 3.5 GiB at 1024x1024 and 8 GiB at 2048x2048, where the VAE
    decode of the full-resolution image dominates.
    """
    area_ratio = (max_image_size / 1024) ** 2
    return int(2 * GIB + 1.5 * GIB * area_ratio)


def choose_offload(
    requested: str,
    *,
    on_cuda: bool,
    free_bytes: int,
    weights_bytes: int,
    largest_component_bytes: int,
    headroom_bytes: int,
) -> OffloadMode:
    """`auto` keeps everything on the GPU when it fits, else one component at a time
    (model offload), else layer by layer (sequential offload: slow but fits ~4 GB cards)."""
    if not on_cuda:
        return "none"  # offloading to the CPU from the CPU saves nothing
    if requested in ("none", "model", "sequential"):
        return requested  # type: ignore[return-value]
    if free_bytes >= weights_bytes + headroom_bytes:
        return "none"
    if free_bytes >= largest_component_bytes + headroom_bytes:
        return "model"
    return "sequential"
