"""Timing, FLOP counting and the matmul ceiling, on CUDA or the CPU alike."""

import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

# aten ops that FlopCounterMode counts as attention (where it counts them at all).
_ATTENTION_OPS = ("attention",)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], Any], device: torch.device, repeats: int = 1) -> float:
    """Best wall time of `repeats` calls, with the device drained before and after each: other
    load on a shared machine only ever adds time, so the minimum is the least noisy figure."""
    timings = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        fn()
        synchronize(device)
        timings.append(time.perf_counter() - started)
    return min(timings)


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> float:
    """What one large matrix product reaches here: the practical ceiling for the floor."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    elapsed = seconds(lambda: [a @ b for _ in range(repeats)], device)
    return 2 * size**3 * repeats / elapsed / 1e12


def count_flops(fn: Callable[[], Any]) -> tuple[int, int]:
    """(all counted FLOPs, of which attention kernels) for one call of `fn`."""
    with FlopCounterMode(display=False) as counter:
        fn()
    by_op = counter.get_flop_counts().get("Global", {})
    attention = sum(n for op, n in by_op.items() if any(a in str(op) for a in _ATTENTION_OPS))
    return counter.get_total_flops(), attention


def attention_flops(heads: int, head_dim: int, tokens: int, layers: int, batch: int = 1) -> int:
    """QK^T and PV of full self-attention: 2 products of tokens^2 x head_dim, 2 FLOPs a MAC."""
    return 4 * batch * heads * tokens**2 * head_dim * layers


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
