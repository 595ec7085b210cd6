"""Where the pipeline runs and in which precision."""

import torch

from ovis_service.config import SettingsError
from ovis_service.pipeline.tiny import TINY_MODEL_ID

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
