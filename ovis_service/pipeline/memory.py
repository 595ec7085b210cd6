"""Memory arithmetic: the memory mode from the VRAM we measure, and whether several copies of
the model fit one device. Pure functions, so tests feed them fake figures; `plan_placement` and
`place` apply them to a pipeline, for the engine and the speed benchmark alike."""

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


class WeightsSize(NamedTuple):
    total_bytes: int
    largest_component_bytes: int


class Placement(NamedTuple):
    """The memory mode chosen for a pipeline, and the figures it was chosen from."""

    offload: OffloadMode
    free_bytes: int  # free on the device before the weights move; 0 on the CPU
    weights: WeightsSize


def pipeline_weights(pipe: OvisImagePipeline) -> WeightsSize:
    sizes = [_module_bytes(component) for component in pipe.components.values()]
    return WeightsSize(total_bytes=sum(sizes), largest_component_bytes=max(sizes))


def _module_bytes(component: object) -> int:
    if not isinstance(component, torch.nn.Module):
        return 0  # tokenizer, scheduler
    return sum(p.numel() * p.element_size() for p in component.parameters())


def plan_placement(
    pipe: OvisImagePipeline, requested: str, device: torch.device, *, max_image_size: int
) -> Placement:
    """The memory mode for `pipe` on `device`, from the VRAM free there now."""
    on_cuda = device.type == "cuda"
    weights = pipeline_weights(pipe)
    free_bytes = torch.cuda.mem_get_info(device)[0] if on_cuda else 0
    offload = choose_offload(
        requested,
        on_cuda=on_cuda,
        free_bytes=free_bytes,
        weights_bytes=weights.total_bytes,
        largest_component_bytes=weights.largest_component_bytes,
        headroom_bytes=activation_headroom(max_image_size),
    )
    return Placement(offload=offload, free_bytes=free_bytes, weights=weights)


def place(pipe: OvisImagePipeline, offload: OffloadMode, device: torch.device) -> None:
    """Move the weights as the memory mode says. Both offload modes first gather the weights in
    CPU memory (diffusers does that), so the pipeline may start on the CPU or on the device."""
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)


def resident_bytes(offload: str, weights: WeightsSize) -> int:
    """What one copy keeps on the device in a memory mode (`auto` counts as fully resident:
    several copies on one device only pay off when none of them shuttles weights over PCIe)."""
    if offload == "model":
        return weights.largest_component_bytes
    if offload == "sequential":
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
    headroom do not fit in its free memory. One copy always starts: the memory mode (offload)
    is how a single copy fits a small device."""
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
        f"{free_bytes / GIB:.1f} GiB free. Lower OVIS_WORKERS, list {device} fewer times in "
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
