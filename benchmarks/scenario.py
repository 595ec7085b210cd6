"""A benchmark scenario is a set of the service's own settings, and runs the way the service runs.

`Scenario` names the `Settings` fields that change how an image is made (the speed levers and the
memory mode). `build_pipeline` makes the weights; `set_up` then does what `DiffusersEngine.load`
does with them: place them for the memory mode (`memory.plan_placement`, `memory.place`) and
apply the levers (`levers.apply`). A figure can therefore only describe code that ships.
diffusers' `benchmarks/benchmarking_utils.py` has the same shape: a scenario, a fresh model.
"""

from dataclasses import dataclass, fields

import msgspec
import torch
from diffusers import OvisImagePipeline

from benchmarks.architecture import build_full_size_pipeline
from ovis_service.config import Settings
from ovis_service.pipeline import levers, memory
from ovis_service.pipeline.levers import Levers
from ovis_service.pipeline.tiny import TINY_MODEL_ID, build_tiny_pipeline

_SERVICE = Settings()  # a field a scenario leaves out keeps the service's default


@dataclass(frozen=True, kw_only=True)
class Scenario:
    """One configuration to time: a label, and the service settings it runs with."""

    name: str
    cfg_batch: bool = _SERVICE.cfg_batch
    compile: str = _SERVICE.compile
    attention: str = _SERVICE.attention
    step_cache: str = _SERVICE.step_cache
    step_cache_threshold: float = _SERVICE.step_cache_threshold
    quantize: str = _SERVICE.quantize
    # The service's `auto` picks a mode from the free VRAM; a scenario names the one it times.
    offload: str = "none"
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
    """Raise the `SettingsError` the service would stop at startup with, if any."""
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


def set_up(pipe: OvisImagePipeline, scenario: Scenario, device: torch.device) -> Levers:
    """Prepare `pipe` as `DiffusersEngine.load` does: place it, then apply the levers. Returns
    the levers, whose `cfg_batch` the denoising loop reads."""
    settings = scenario.settings()
    placement = memory.plan_placement(
        pipe, settings.offload, device, max_image_size=settings.max_image_size
    )
    memory.place(pipe, placement.offload, device)
    chosen = Levers.from_settings(settings)
    levers.apply(pipe, chosen)
    return chosen
