"""Memory arithmetic: which memory plan (`OVIS_OFFLOAD`) fits the VRAM budget, and whether
several copies of the model fit one device. Pure functions, so tests feed them fake sizes;
`plan_placement` measures a pipeline for them, and `offload.place` applies the plan."""

import json
import math
import struct
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from diffusers import OvisImagePipeline
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

from ovis_service.config import SettingsError

OffloadMode = Literal["none", "encoder", "group", "model", "sequential"]
# Fastest first: `auto` takes the first that fits. `model` moves the whole transformer once per
# request, `group` streams part of it once per step, `sequential` all of it layer by layer.
PLANS: tuple[OffloadMode, ...] = ("none", "encoder", "model", "group", "sequential")
# Blocks a streamed transformer holds at once: the one computing, the one being copied in, and
# one whose memory waits for the compute stream to finish with it before it is reused.
STREAM_DEPTH = 3
GIB = 1024**3


def activation_headroom(max_image_size: int) -> int:
    """Room for activations and the VAE decode, which grow with the pixel count.

    An estimate with margin: 3.5 GiB at 1024x1024 (measured on an H200: resident peak 19.5 GiB
    for 18.3 GB of weights, sequential offload 2.4 GiB) and 8 GiB at 2048x2048, where the VAE
    decode of the full-resolution image dominates.
    """
    area_ratio = (max_image_size / 1024) ** 2
    return int(2 * GIB + 1.5 * GIB * area_ratio)


class ComponentSizes(NamedTuple):
    """Bytes of each component's weights in the dtype they run in."""

    transformer: int
    text_encoder: int
    vae: int
    # The transformer's blocks in the order they run; part of `transformer`. Empty when unknown
    # (before the weights are loaded), which leaves `group` out of the choice.
    blocks: tuple[int, ...] = ()

    @property
    def total(self) -> int:
        return self.transformer + self.text_encoder + self.vae


class Plan(NamedTuple):
    offload: OffloadMode
    resident_blocks: int  # `group`: the leading transformer blocks that stay on the device
    needs_bytes: int  # the peak the plan is sized for, headroom included
    reason: str


def needs(plan: OffloadMode, sizes: ComponentSizes, headroom: int, resident_blocks: int = 0) -> int:
    """The peak VRAM of one copy in `plan`, with room for the largest allowed image."""
    if plan == "none":
        return sizes.total + headroom
    if plan == "encoder":
        # The text encoder comes in to encode and leaves before the first transformer forward.
        return sizes.transformer + sizes.vae + max(headroom, sizes.text_encoder)
    if plan == "model":
        # The text encoder and the transformer take turns; the VAE stays.
        return max(sizes.transformer, sizes.text_encoder) + sizes.vae + headroom
    if plan == "group":
        kept, streamed = sizes.blocks[:resident_blocks], sizes.blocks[resident_blocks:]
        outside_blocks = sizes.transformer - sum(sizes.blocks)
        working = STREAM_DEPTH * max(streamed, default=0)
        return outside_blocks + sum(kept) + working + sizes.vae + max(headroom, sizes.text_encoder)
    return sizes.vae + headroom  # sequential: one layer at a time, and the VAE


def choose_plan(
    requested: str,
    sizes: ComponentSizes,
    *,
    on_cuda: bool,
    budget_bytes: int,
    headroom_bytes: int,
    streamable: bool = True,
) -> Plan | None:
    """The memory plan: the one asked for, or for `auto` the fastest that fits the budget; None
    when `auto` finds none. `group` keeps as many leading blocks resident as the budget allows.
    `streamable=False` leaves `group` out (fp8 weights cannot be streamed)."""
    if not on_cuda:
        return Plan("none", len(sizes.blocks), sizes.total, "no GPU: nothing to offload")
    if requested != "auto":
        plan: OffloadMode = requested  # type: ignore[assignment]
        kept = _resident_blocks(sizes, budget_bytes, headroom_bytes) if plan == "group" else 0
        return Plan(plan, kept, needs(plan, sizes, headroom_bytes, kept), "asked for")
    for plan in PLANS:
        if plan == "group":
            if not streamable or not sizes.blocks:
                continue
            kept = _resident_blocks(sizes, budget_bytes, headroom_bytes)
        else:
            kept = 0
        need = needs(plan, sizes, headroom_bytes, kept)
        if need <= budget_bytes:
            faster = [p for p in PLANS[: PLANS.index(plan)] if p != "group" or sizes.blocks]
            why = f"needs {need / GIB:.1f} GiB of {budget_bytes / GIB:.1f} GiB"
            if faster:
                why += f"; {', '.join(faster)} would not fit"
            return Plan(plan, kept, need, why)
    return None


def largest_image_that_fits(sizes: ComponentSizes, budget_bytes: int) -> int | None:
    """The largest OVIS_MAX_IMAGE_SIZE (a multiple of 16, at least 256) for which some plan fits
    `budget_bytes`; None when not even 256 does."""
    for side in range(4096, 255, -16):
        if needs("sequential", sizes, activation_headroom(side)) <= budget_bytes:
            return side
    return None


def _resident_blocks(sizes: ComponentSizes, budget_bytes: int, headroom_bytes: int) -> int:
    """The most leading blocks `group` can keep resident, at least one block streamed."""
    kept = 0
    for count in range(1, len(sizes.blocks)):
        if needs("group", sizes, headroom_bytes, count) > budget_bytes:
            break
        kept = count
    return kept


class WeightsSize(NamedTuple):
    total_bytes: int
    largest_component_bytes: int
    text_encoder_bytes: int = 0  # what `encoder` takes off the device; 0 when unknown


class Placement(NamedTuple):
    """The memory plan chosen for a pipeline, and the figures it was chosen from."""

    plan: Plan
    budget_bytes: int  # this copy's share of the device's budget; 0 on the CPU
    sizes: ComponentSizes

    @property
    def offload(self) -> OffloadMode:
        return self.plan.offload

    def describe(self) -> str:
        """The plan for /health and the logs; `group` says how many blocks stay resident."""
        if self.plan.offload == "group":
            return f"group({self.plan.resident_blocks}/{len(self.sizes.blocks)} resident)"
        return self.plan.offload

    @property
    def weights(self) -> WeightsSize:
        parts = (self.sizes.transformer, self.sizes.text_encoder, self.sizes.vae)
        return WeightsSize(sum(parts), max(parts), self.sizes.text_encoder)


def transformer_blocks(pipe: OvisImagePipeline) -> list[torch.nn.Module]:
    """The transformer's blocks in the order its forward runs them."""
    transformer = pipe.transformer
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


def component_sizes(pipe: OvisImagePipeline) -> ComponentSizes:
    return ComponentSizes(
        transformer=_module_bytes(pipe.transformer),
        text_encoder=_module_bytes(pipe.text_encoder),
        vae=_module_bytes(pipe.vae),
        blocks=tuple(_module_bytes(block) for block in transformer_blocks(pipe)),
    )


def pipeline_weights(pipe: OvisImagePipeline) -> WeightsSize:
    sizes = [_module_bytes(component) for component in pipe.components.values()]
    return WeightsSize(total_bytes=sum(sizes), largest_component_bytes=max(sizes))


def _module_bytes(component: object) -> int:
    if not isinstance(component, torch.nn.Module):
        return 0  # tokenizer, scheduler
    tensors = [*component.parameters(), *component.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def plan_placement(
    pipe: OvisImagePipeline,
    requested: str,
    device: torch.device,
    *,
    budget_bytes: int,
    max_image_size: int,
    streamable: bool = True,
) -> Placement:
    """The memory plan for `pipe` on `device` within `budget_bytes` (this copy's share). A
    budget too small for any plan stops startup, naming the setting that sets it."""
    on_cuda = device.type == "cuda"
    sizes = component_sizes(pipe)
    headroom = activation_headroom(max_image_size)
    plan = choose_plan(
        requested,
        sizes,
        on_cuda=on_cuda,
        budget_bytes=budget_bytes,
        headroom_bytes=headroom,
        streamable=streamable,
    )
    if plan is None:
        least = needs("sequential", sizes, headroom)
        fits = largest_image_that_fits(sizes, budget_bytes)
        lower = (
            f"lower OVIS_MAX_IMAGE_SIZE to {fits} or less" if fits else "lower OVIS_MAX_IMAGE_SIZE"
        )
        raise SettingsError(
            f"the memory budget (OVIS_GPU_MEMORY, or what is free when it is unset) leaves "
            f"{budget_bytes / GIB:.1f} GiB for each copy of the model on {device}, and even "
            f"OVIS_OFFLOAD=sequential needs about {least / GIB:.1f} GiB with "
            f"OVIS_MAX_IMAGE_SIZE={max_image_size}; {lower}, raise OVIS_GPU_MEMORY (or free "
            "the GPU), or run fewer copies on this device (OVIS_WORKERS)"
        )
    return Placement(plan=plan, budget_bytes=budget_bytes if on_cuda else 0, sizes=sizes)


def resident_bytes(offload: str, weights: WeightsSize) -> int:
    """What one copy keeps on the device between requests in a memory plan. `auto` counts as
    fully resident: several copies on one device only pay off when none of them moves weights
    over PCIe. `group` counts its least (its share of the budget decides how much stays)."""
    if offload == "encoder":
        return weights.total_bytes - weights.text_encoder_bytes
    if offload == "model":
        return weights.largest_component_bytes  # the transformer stays until the next prompt
    if offload in ("group", "sequential"):
        return 0
    return weights.total_bytes


def check_fit(
    *,
    device: str,
    copies: int,
    free_bytes: int,
    weights: WeightsSize,
    headroom_bytes: int,
    offload: str,
    workers: int,
    devices: str,
) -> None:
    """Refuse to start `copies` pipelines on one device when their weights plus activation
    headroom do not fit its budget (`free_bytes`: `OVIS_GPU_MEMORY`, or what is free). One copy
    always starts: the memory plan (offload) is how a single copy fits a small device."""
    if copies <= 1:
        return
    each = resident_bytes(offload, weights) + headroom_bytes
    if copies * each <= free_bytes:
        return
    raise SettingsError(
        f"OVIS_WORKERS={workers} with OVIS_DEVICES={devices} puts {copies} copies of the model "
        f"on {device}: each needs "
        f"about {each / GIB:.1f} GiB ({resident_bytes(offload, weights) / GIB:.1f} GiB of weights "
        f"with OVIS_OFFLOAD={offload} plus {headroom_bytes / GIB:.1f} GiB of activation headroom "
        f"for OVIS_MAX_IMAGE_SIZE), {copies * each / GIB:.1f} GiB in all, but {device} has "
        f"{free_bytes / GIB:.1f} GiB to give (OVIS_GPU_MEMORY, or what is free when it is "
        "unset). Lower OVIS_WORKERS, list {device} fewer times in "
        "OVIS_DEVICES, or lower OVIS_MAX_IMAGE_SIZE."
    )


# Parameter counts of Ovis-Image-7B's components (counted on the meta device from the class
# defaults), so that the fit check works before the weights are downloaded.
_KNOWN_PARAMETERS = {
    "AIDC-AI/Ovis-Image-7B": {
        "transformer": 7_370_000_000,
        "text_encoder": 1_720_000_000,
        "vae": 84_000_000,
    },
}


def estimate_weights(model: str, bytes_per_param: int) -> WeightsSize | None:
    """Weights of `model` in the dtype it will run in: from known counts, else from the
    safetensors headers of a local directory or of the hub cache. None when nothing says."""
    known = _KNOWN_PARAMETERS.get(model)
    if known is not None:
        return _size(known, bytes_per_param)
    directory = Path(model)
    if not directory.is_dir():
        directory = _cached_snapshot(model) or directory
    if not directory.is_dir():
        return None
    counts: dict[str, int] = {}
    for path in directory.rglob("*.safetensors"):
        component = path.relative_to(directory).parts[0] if path.parent != directory else ""
        counts[component] = counts.get(component, 0) + _safetensors_parameters(path)
    return _size(counts, bytes_per_param) if counts else None


def _size(counts: dict[str, int], bytes_per_param: int) -> WeightsSize:
    return WeightsSize(
        total_bytes=sum(counts.values()) * bytes_per_param,
        largest_component_bytes=max(counts.values()) * bytes_per_param,
        text_encoder_bytes=counts.get("text_encoder", 0) * bytes_per_param,
    )


def _safetensors_parameters(path: Path) -> int:
    """The parameter count in a safetensors file, from its JSON header alone."""
    with path.open("rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
    return sum(
        math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__"
    )


def _cached_snapshot(model: str) -> Path | None:
    try:
        return Path(snapshot_download(model, local_files_only=True))
    except (HfHubHTTPError, LocalEntryNotFoundError, ValueError, OSError):
        return None
