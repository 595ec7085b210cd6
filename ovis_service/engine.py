"""The seam between the worker and whatever makes images.

The worker only ever talks to an `Engine`. The diffusers implementation lives in
`ovis_service.pipeline`; tests pass fakes that count calls, raise, run out of memory or stall.
"""

from collections.abc import Callable
from typing import Protocol

import msgspec
from PIL import Image

from ovis_service.schemas import GenerationParams

StopCheck = Callable[[], None]
"""Called between denoising steps; raises to stop the run (cancelled, deadline, shutdown)."""


class EngineInfo(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    device: str
    dtype: str
    offload: str


class GenerationResult(msgspec.Struct, frozen=True, kw_only=True):
    image: Image.Image
    prompt_truncated: bool


class Engine(Protocol):
    """Everything here is called from the inference thread only."""

    model_id: str

    def load(self) -> EngineInfo:
        """Load weights onto the device; slow, so it runs on the inference thread."""
        ...

    def generate(self, params: GenerationParams, stop_check: StopCheck) -> GenerationResult: ...

    def is_out_of_memory(self, error: BaseException) -> bool: ...

    def recover_from_oom(self) -> None:
        """Free cached device memory so the next job has a chance."""
        ...

    def release(self) -> None:
        """Drop the pipeline and give the device memory back."""
        ...
