"""A benchmark scenario is a set of the service's own settings, and runs the way the service runs.

`Scenario` names the `Settings` fields that change how an image is made (the speed levers, the
memory plan and its budget). `build_pipeline` makes the weights; `set_up` then hands them to
`prepare.prepare`, which `DiffusersEngine.load` calls too: plan within the budget, place, resolve
compile, apply the levers. A figure can therefore only describe code that ships.
diffusers' `benchmarks/benchmarking_utils.py` has the same shape: a scenario, a fresh model.
"""

from dataclasses import dataclass, fields

import msgspec
import torch
from diffusers import OvisImagePipeline

from benchmarks.architecture import build_full_size_pipeline
from ovis_service.config import Settings
from ovis_service.pipeline import levers
from ovis_service.pipeline.levers import Levers
from ovis_service.pipeline.prepare import Prepared, prepare
from ovis_service.pipeline.tiny import TINY_MODEL_ID, build_tiny_pipeline

_SERVICE = Settings()  # a field a scenario leaves out keeps the service's default


@dataclass(frozen=True, kw_only=True)
class Scenario:
    """One configuration to time: a label, and the service settings it runs with."""

    name: str
    cfg_batch: bool = _SERVICE.cfg_batch
    # Lever rows are eager unless they name compile; the service's default (`auto`) compiles on
    # CUDA, which the budget rows time.
    compile: str = "none"
    attention: str = _SERVICE.attention
    step_cache: str = _SERVICE.step_cache
    step_cache_threshold: float = _SERVICE.step_cache_threshold
    quantize: str = _SERVICE.quantize
    # The service's `auto` picks a plan from the budget; a lever row names the one it times.
    offload: str = "none"
    gpu_memory: str = _SERVICE.gpu_memory
    workers: int = _SERVICE.workers  # copies on the device, which share its budget
    max_image_size: int = _SERVICE.max_image_size
    # Time the plain `OvisImagePipeline.__call__` instead of the service's loop: the baseline.
    diffusers_call: bool = False
    note: str = ""

    @property
    def lossless(self) -> bool:
        return self.step_cache == "none" and self.quantize == "none"

    def settings(self) -> Settings:
        """The service's settings for this scenario; a value the service would refuse at startup
        (a misspelt backend, say) is refused here too."""
        chosen = {field: getattr(self, field) for field in _SETTINGS_FIELDS}
        return msgspec.convert(chosen, Settings)


_SETTINGS_FIELDS = tuple(
    field.name for field in fields(Scenario) if field.name in Settings.__struct_fields__
)


def check(scenario: Scenario, device: torch.device, dtype: torch.dtype) -> None:
    """Raise the `SettingsError` the service would stop at startup with, if any (before the
    memory plan is known: the plan-dependent refusals come from `set_up`)."""
    levers.check(Levers.from_settings(scenario.settings()), device, dtype)


def build_pipeline(model: str, device: torch.device, dtype: torch.dtype) -> OvisImagePipeline:
    """The weights before placement: the tiny model as the engine builds it; the full-size
    architecture with random weights made on the device (seconds there, minutes on a CPU).
    Placement moves them where the memory mode wants them either way."""
    if model == TINY_MODEL_ID:
        pipe = build_tiny_pipeline()
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
    else:
        pipe = build_full_size_pipeline(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def set_up(pipe: OvisImagePipeline, scenario: Scenario, device: torch.device) -> Prepared:
    """Prepare `pipe` as `DiffusersEngine.load` does. Returns the plan and the levers in force
    (their `cfg_batch` is what the denoising loop reads)."""
    return prepare(pipe, scenario.settings(), device)
