"""Engines for tests: real `Engine` implementations whose behaviour the prompt chooses.

The prompt picks the fault, so end-to-end tests can inject one through plain HTTP:
- `fail...`  raises an ordinary exception (with a path in its text that must never leak);
- `oom...`   raises an out-of-memory error the engine recognises;
- `held...`  waits, once running, until the test creates the engine's `hold_file`;
- anything else sleeps `step_seconds` per step, checking `stop_check` between steps.
"""

import threading
import time
from pathlib import Path

from PIL import Image

from ovis_service.engine import EngineInfo, GenerationResult, StepHooks
from ovis_service.schemas import GenerationParams

SECRET_IN_ERROR = "/srv/secret/weights.bin"


class FakeOutOfMemoryError(RuntimeError):
    pass


class FakeClock:
    """A monotonic clock that moves only when told: hand it to the worker as `clock` and to
    `FakeEngine`, whose steps then advance it instead of sleeping, so timings are exact."""

    def __init__(self) -> None:
        self._now = 1000.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


class FakeEngine:
    def __init__(
        self,
        *,
        step_seconds: float = 0.0,
        load_seconds: float = 0.0,
        load_error: Exception | None = None,
        gate: threading.Event | None = None,
        model_id: str = "fake",
        clock: FakeClock | None = None,
        hold_file: Path | None = None,
    ) -> None:
        self.model_id = model_id
        self.step_seconds = step_seconds
        self.load_seconds = load_seconds
        self.load_error = load_error
        self.gate = gate  # when given, each generation waits for it before its first step
        self.clock = clock  # when given, a step advances it by step_seconds instead of sleeping
        # `held...` prompts run until this file exists: a test in another process holds jobs
        # on the device for as long as it needs, instead of guessing how long is long enough.
        self.hold_file = hold_file
        self.started: list[str] = []  # prompts, in the order generation began
        self.completed: list[str] = []
        self.steps_run = 0
        self.oom_recoveries = 0
        self.released = False
        self.threads: set[str] = set()  # names of the threads that touched the engine
        self.running = threading.Event()  # set while a generation is in progress

    def _touch(self) -> None:
        self.threads.add(threading.current_thread().name)

    def _wait_for_hold_file(self) -> None:
        if self.hold_file is None:
            raise RuntimeError("a held prompt needs the engine's hold_file")
        give_up = time.monotonic() + 60  # a test that never releases fails, not hangs
        while not self.hold_file.exists():
            if time.monotonic() > give_up:
                raise TimeoutError("the hold file never appeared")
            time.sleep(0.01)

    def load(self) -> EngineInfo:
        self._touch()
        time.sleep(self.load_seconds)
        if self.load_error is not None:
            raise self.load_error
        return EngineInfo(model=self.model_id, device="cpu", dtype="float32", offload="none")

    def generate(self, params: GenerationParams, hooks: StepHooks) -> GenerationResult:
        self._touch()
        self.started.append(params.prompt)
        self.running.set()
        try:
            if self.gate is not None and not self.gate.wait(timeout=30):
                raise TimeoutError("test gate never opened")
            if params.prompt.startswith("fail"):
                raise RuntimeError(f"boom while reading {SECRET_IN_ERROR}")
            if params.prompt.startswith("oom"):
                raise FakeOutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            if params.prompt.startswith("held"):
                self._wait_for_hold_file()
            for step in range(params.num_inference_steps):
                if self.clock is not None:
                    self.clock.advance(self.step_seconds)
                else:
                    time.sleep(self.step_seconds)
                self.steps_run += 1
                hooks.stop_check()
                hooks.on_progress(step + 1, params.num_inference_steps)
                if step + 1 in hooks.preview_steps:
                    hooks.on_preview(step + 1, Image.new("RGB", (params.width, params.height)))
        finally:
            self.running.clear()
        self.completed.append(params.prompt)
        shade = params.seed % 256
        image = Image.new("RGB", (params.width, params.height), (shade, 0, 255 - shade))
        return GenerationResult(image=image, prompt_truncated=len(params.prompt) > 1000)

    def is_out_of_memory(self, error: BaseException) -> bool:
        return isinstance(error, FakeOutOfMemoryError)

    def recover_from_oom(self) -> None:
        self._touch()
        self.oom_recoveries += 1

    def release(self) -> None:
        self._touch()
        self.released = True


class BrokenRecoveryEngine(FakeEngine):
    """A fault outside the per-job guard: recovering from out of memory itself blows up, so an
    `oom...` prompt kills the inference thread that runs it."""

    def recover_from_oom(self) -> None:
        raise RuntimeError("driver gone")
