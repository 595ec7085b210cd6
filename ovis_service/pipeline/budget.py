"""The VRAM budget of each device (`OVIS_GPU_MEMORY`): what the memory plan and the fit check
plan with, enforced through torch's per-process memory fraction.

The budget is per process and per device, as torch's fraction is, so it is worked out once per
device (before any weights move there) and every copy of the model on that device shares it.
"""

import threading
from typing import NamedTuple

import structlog
import torch

from ovis_service.config import parse_gpu_memory

logger = structlog.get_logger(__name__)

GIB = 1024**3


class Budget(NamedTuple):
    bytes: int  # what the plans may use on the device
    enforced: bool  # capped with torch's memory fraction (only when the setting is given)
    source: str  # how it was worked out, for the startup log


def resolve(setting: str, *, free_bytes: int, total_bytes: int) -> Budget:
    """The budget from `OVIS_GPU_MEMORY` (already validated) and the device's free and total
    memory. Empty means what is free now. A figure above what is free is planned as what is free:
    torch cannot use memory another process holds."""
    amount, fraction = parse_gpu_memory(setting)
    if amount is None and fraction is None:
        return Budget(free_bytes, False, "free memory (OVIS_GPU_MEMORY unset)")
    wanted = amount if amount is not None else int((fraction or 0) * total_bytes)
    wanted = min(wanted, total_bytes)
    if wanted > free_bytes:
        logger.warning(
            "gpu_memory_above_free",
            setting=f"OVIS_GPU_MEMORY={setting}",
            wanted_gib=round(wanted / GIB, 2),
            free_gib=round(free_bytes / GIB, 2),
            note="planning with what is free; other processes hold the rest",
        )
        return Budget(free_bytes, True, f"OVIS_GPU_MEMORY={setting}, capped by free memory")
    return Budget(wanted, True, f"OVIS_GPU_MEMORY={setting}")


_lock = threading.Lock()
_budgets: dict[int, Budget] = {}  # device index -> budget, for this process


def device_budget(setting: str, device: torch.device) -> Budget:
    """The budget of a CUDA device, worked out and enforced on first use in this process."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _lock:
        if index not in _budgets:
            free, total = torch.cuda.mem_get_info(index)
            budget = resolve(setting, free_bytes=int(free), total_bytes=int(total))
            if budget.enforced:
                enforce(torch.device("cuda", index), budget.bytes)
            _budgets[index] = budget
        return _budgets[index]


def enforce(device: torch.device, budget_bytes: int) -> None:
    """Cap this process's caching allocator on `device` at `budget_bytes`: an allocation past
    it raises torch.OutOfMemoryError (answered 503, then recovered) instead of taking more."""
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_bytes / total), device)


def forget() -> None:
    """Drop the budgets worked out so far and lift the caps: for benchmarks that emulate
    several card sizes in one process."""
    with _lock:
        for index in _budgets:
            torch.cuda.set_per_process_memory_fraction(1.0, index)
        _budgets.clear()
