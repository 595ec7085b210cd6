"""Setting a loaded pipeline up the way the service runs it: the memory plan within the
device's budget, the weights placed for it, then the speed levers, compile resolved for that
plan. The engine and the speed benchmark both call `prepare`, so a benchmark figure describes
the code that ships.
"""

from dataclasses import replace
from typing import NamedTuple

import structlog
import torch
from diffusers import OvisImagePipeline

from ovis_service.config import Settings, SettingsError
from ovis_service.pipeline import levers as levers_module
from ovis_service.pipeline.budget import Budget, device_budget
from ovis_service.pipeline.device import copies_on
from ovis_service.pipeline.levers import Levers
from ovis_service.pipeline.loading import explained_failures
from ovis_service.pipeline.memory import GIB, Placement, plan_placement
from ovis_service.pipeline.offload import place

logger = structlog.get_logger(__name__)


class Prepared(NamedTuple):
    placement: Placement
    levers: Levers  # `compile` resolved: none or regional
    compile_reason: str


def prepare(
    pipe: OvisImagePipeline,
    settings: Settings,
    device: torch.device,
    budget: Budget | None = None,
) -> Prepared:
    """Plan, place, and apply the levers to `pipe` (on the CPU or already on `device`).
    `budget` overrides the device's (`OVIS_GPU_MEMORY`, worked out once per process)."""
    levers = Levers.from_settings(settings)
    share, source = 0, "no GPU"
    if device.type == "cuda":
        budget = budget or device_budget(settings.gpu_memory, device)
        # Every copy of the model on this device shares its budget.
        share, source = budget.bytes // copies_on(settings, device), budget.source
    placement = plan_placement(
        pipe,
        settings.offload,
        device,
        budget_bytes=share,
        max_image_size=settings.max_image_size,
        # fp8 swaps the weights for other tensors after placement; streamed copies would still
        # hold the old ones.
        streamable=levers.quantize == "none",
    )
    _check(placement, settings, device, levers)
    _log_plan(placement, settings, device, source)
    # Moving the weights is where a GPU that is too small runs out of memory.
    with explained_failures(settings.model):
        place(pipe, placement.plan, device)
    compiled, why = levers_module.resolve_compile(
        levers, device, placement.plan, len(placement.sizes.blocks)
    )
    levers = replace(levers, compile=compiled)
    logger.info(
        "compile_chosen",
        requested=settings.compile,
        chosen=compiled,
        reason=why,
        cache_dir=settings.compile_cache_dir or "torch's default",
    )
    levers_module.apply(pipe, levers)
    return Prepared(placement, levers, why)


def _check(placement: Placement, settings: Settings, device: torch.device, levers: Levers) -> None:
    """An explicit plan that cannot work here stops startup; one over the budget warns, or
    stops startup when the operator set the budget."""
    plan = placement.plan
    if device.type != "cuda":
        return
    if plan.offload == "group" and levers.quantize != "none":
        raise SettingsError(
            "OVIS_OFFLOAD=group cannot stream fp8 weights (OVIS_QUANTIZE=fp8); "
            "use OVIS_OFFLOAD=auto, encoder or model"
        )
    if plan.needs_bytes <= placement.budget_bytes:
        return
    message = (
        f"OVIS_OFFLOAD={plan.offload} needs about {plan.needs_bytes / GIB:.1f} GiB on {device} "
        f"with OVIS_MAX_IMAGE_SIZE={settings.max_image_size}, more than the "
        f"{placement.budget_bytes / GIB:.1f} GiB this copy may use"
    )
    if settings.gpu_memory:
        raise SettingsError(
            f"{message} (OVIS_GPU_MEMORY={settings.gpu_memory}); set OVIS_OFFLOAD=auto, raise "
            "OVIS_GPU_MEMORY or lower OVIS_MAX_IMAGE_SIZE"
        )
    logger.warning("memory_plan_over_budget", note=message)


def _log_plan(
    placement: Placement, settings: Settings, device: torch.device, budget_source: str
) -> None:
    weights_bytes = placement.weights.total_bytes
    plan = placement.plan
    if device.type == "cuda":
        logger.info(
            "memory_mode_chosen",
            requested=settings.offload,
            chosen=plan.offload,
            reason=plan.reason,
            resident_blocks=plan.resident_blocks,
            blocks=len(placement.sizes.blocks),
            needs_gib=round(plan.needs_bytes / GIB, 2),
            budget_gib=round(placement.budget_bytes / GIB, 2),
            budget=budget_source,
            weights_gib=round(weights_bytes / GIB, 3),
        )
        return
    offload = settings.offload
    ignored = [
        (
            "OVIS_OFFLOAD",
            offload if offload not in ("auto", "none") else "",
            "there is no GPU: offload moves weights between CPU and GPU memory",
        ),
        ("OVIS_GPU_MEMORY", settings.gpu_memory, "there is no GPU memory to cap"),
    ]
    for setting, value, reason in ignored:
        if value:
            logger.warning("gpu_only_setting_ignored", setting=setting, value=value, reason=reason)
    logger.info(
        "memory_mode_chosen",
        requested=offload,
        chosen=plan.offload,
        device="cpu",
        note="no GPU: every weight stays in CPU memory, so there is nothing to offload",
        weights_mib=round(weights_bytes / 2**20, 1),  # the tiny model's round to 0 GiB
    )
