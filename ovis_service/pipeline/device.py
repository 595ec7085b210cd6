"""Where the pipelines run (which devices, how many copies on each) and in which precision."""

from collections import Counter
from collections.abc import Callable

import structlog
import torch

from ovis_service.config import Settings, SettingsError
from ovis_service.pipeline.budget import device_budget
from ovis_service.pipeline.memory import (
    WeightsSize,
    activation_headroom,
    check_fit,
    estimate_weights,
)
from ovis_service.pipeline.tiny import TINY_MODEL_ID, build_tiny_pipeline

logger = structlog.get_logger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(requested: str, model: str) -> torch.device:
    """`auto` means CUDA when there is one. The real model on a CPU takes many minutes per image,
    so without CUDA it only runs when the operator asks for the CPU by name."""
    if requested != "auto":
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SettingsError(f"OVIS_DEVICE={requested}, but no CUDA device is visible")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if model == TINY_MODEL_ID:
        return torch.device("cpu")
    raise SettingsError(
        f"no CUDA device found, and {model} needs a GPU to be usable. "
        "Set OVIS_DEVICE=cpu to run it on the CPU anyway (minutes per image), "
        "or OVIS_MODEL=tiny to try the service without a GPU."
    )


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested != "auto":
        return _DTYPES[requested]
    # bf16 is what the weights ship in; CPUs run float32 faster and without surprises.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return device.type


def requested_devices(device: str, devices: str) -> list[str]:
    """The device names asked for: `OVIS_DEVICES`, or `OVIS_DEVICE`, its one-device synonym."""
    if devices != "auto" and device not in ("auto", devices):
        raise SettingsError(
            f"OVIS_DEVICE={device} and OVIS_DEVICES={devices} disagree; set only OVIS_DEVICES"
        )
    return devices.split(",") if devices != "auto" else [device]


def visible_cuda_devices() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_devices(
    settings: Settings, cuda_count: Callable[[], int] = visible_cuda_devices
) -> list[torch.device]:
    """One entry per listed device, repeats kept; `auto` is every visible CUDA device."""
    names = requested_devices(settings.device, settings.devices)
    visible = cuda_count()
    if names == ["auto"]:
        if visible:
            return [torch.device("cuda", index) for index in range(visible)]
        return [resolve_device("auto", settings.model)]  # the CPU for tiny, else a refusal
    resolved = []
    for name in names:
        device = torch.device(name)
        if device.type == "cuda":
            index = 0 if device.index is None else device.index
            if index >= visible:
                raise SettingsError(
                    f"OVIS_DEVICES lists {name}, but {visible} CUDA device(s) are visible"
                )
            device = torch.device("cuda", index)
        resolved.append(device)
    return resolved


def plan_threads(
    settings: Settings,
    *,
    cuda_count: Callable[[], int] = visible_cuda_devices,
    free_bytes: Callable[[torch.device], int] | None = None,
) -> list[torch.device]:
    """The device of each inference thread: `OVIS_WORKERS` per listed device. Refuses to start
    when the copies on one CUDA device do not fit its budget (`OVIS_GPU_MEMORY`, or what is
    free; the CPU's RAM is shared with everything else on the machine, so it has no such
    budget). Tests pass fake counts and figures for the two callables."""
    free_bytes = free_bytes or (lambda device: device_budget(settings.gpu_memory, device).bytes)
    devices = resolve_devices(settings, cuda_count)
    copies = Counter(devices)
    for device, count in copies.items():
        total = count * settings.workers
        if device.type != "cuda" or total <= 1:
            continue
        itemsize = resolve_dtype(settings.dtype, device).itemsize
        weights = _weights(settings.model, itemsize)
        if weights is None:
            logger.warning(
                "memory_check_skipped",
                device=str(device),
                copies=total,
                reason="the size of the weights is unknown until they are downloaded",
            )
            continue
        check_fit(
            device=str(device),
            copies=total,
            free_bytes=free_bytes(device),
            weights=weights,
            headroom_bytes=activation_headroom(settings.max_image_size),
            offload=settings.offload,
            workers=settings.workers,
            devices=settings.devices if settings.devices != "auto" else settings.device,
        )
    return [device for device in devices for _ in range(settings.workers)]


def copies_on(
    settings: Settings,
    device: torch.device,
    cuda_count: Callable[[], int] = visible_cuda_devices,
) -> int:
    """How many pipelines this process runs on `device`: they share its memory budget."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    listed = Counter(resolve_devices(settings, cuda_count))
    return max(1, listed[device] * settings.workers)


def _weights(model: str, itemsize: int) -> WeightsSize | None:
    if model == TINY_MODEL_ID:
        pipe = build_tiny_pipeline()
        counts = [
            sum(p.numel() for p in part.parameters())
            for part in pipe.components.values()
            if isinstance(part, torch.nn.Module)
        ]
        text_encoder = sum(p.numel() for p in pipe.text_encoder.parameters())
        return WeightsSize(sum(counts) * itemsize, max(counts) * itemsize, text_encoder * itemsize)
    return estimate_weights(model, itemsize)
