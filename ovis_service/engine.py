"""The seam between the worker and whatever makes images.

The worker only ever talks to an `Engine`. The diffusers implementation lives in
`ovis_service.pipeline`; tests pass fakes that count calls, raise, run out of memory or stall.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import msgspec
from PIL import Image

from ovis_service.schemas import GenerationParams

StopCheck = Callable[[], None]
"""Called between denoising steps; raises to stop the run (cancelled, deadline, shutdown)."""

ProgressCallback = Callable[[int, int], None]
"""`(steps_done, total_steps)`, called after each denoising step."""

PreviewCallback = Callable[[int, Image.Image], None]
"""`(steps_done, image)`: a picture of the current estimate of the final image."""


def _ignore(*_args: object) -> None:
    return None


@dataclass(frozen=True)
class StepHooks:
    """What the inference thread asks of a run besides the image; every hook runs on it."""

    stop_check: StopCheck
    on_progress: ProgressCallback = _ignore
    # Steps done (1-based) after which a preview is wanted; empty means none is rendered.
    preview_steps: frozenset[int] = field(default_factory=frozenset)
    on_preview: PreviewCallback = _ignore


class EngineInfo(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    device: str
    dtype: str
    offload: str
    # Speed levers in force (cfg_batch, compile, attention, step_cache, quantize), by name.
    levers: dict[str, str] = msgspec.field(default_factory=dict)


class GenerationResult(msgspec.Struct, frozen=True, kw_only=True):
    image: Image.Image
    prompt_truncated: bool


class Engine(Protocol):
    """Everything here is called from the inference thread only."""

    model_id: str

    def load(self) -> EngineInfo:
        """Load weights onto the device; slow, so it runs on the inference thread."""
        ...

    def generate(self, params: GenerationParams, hooks: StepHooks) -> GenerationResult:
        """Run every step, calling `hooks.stop_check` and `hooks.on_progress` after each."""
        ...

    def is_out_of_memory(self, error: BaseException) -> bool: ...

    def recover_from_oom(self) -> None:
        """Free cached device memory so the next job has a chance."""
        ...

    def release(self) -> None:
        """Drop the pipeline and give the device memory back."""
        ...
