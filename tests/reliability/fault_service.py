"""The real app and server around an engine with injectable faults, for the reliability suite:
`python -m tests.reliability.fault_service`.

Faults enter only through the `Engine` seam, chosen by the prompt, so a test injects them with a
plain HTTP request:

- `fail...`   the pipeline raises an ordinary exception (its text holds an internal path);
- `oom...`    the pipeline raises an out-of-memory error that the engine recognises; recovery works;
- `poison...` the pipeline runs out of memory and the recovery itself fails, as `empty_cache()`
              does once an illegal memory access has poisoned the CUDA context. Nothing in the
              process can touch the GPU again, so the inference thread dies;
- `stall...`  first spends `FAKE_STALL_SECONDS` in one step that cannot be interrupted (as a VAE
              decode cannot), then goes on like any other prompt; with `FAKE_STALL_GATE` set,
              the step lasts until that file exists instead, so a test decides when it ends;
- anything else takes `FAKE_STEP_SECONDS` per step and checks `stop_check` between steps.

The engine writes one log line when a generation starts, one per step and one when it ends, with
the step it reached, so that a test can wait for a step and prove from the outside that cancelled
work was never done.
"""

import os
import time
from dataclasses import replace
from pathlib import Path

import structlog

from ovis_service.app import create_app
from ovis_service.cli import run_server
from ovis_service.config import load_settings
from ovis_service.engine import GenerationResult, StepHooks
from ovis_service.errors import ServiceError
from ovis_service.logs import configure_logging
from ovis_service.schemas import GenerationParams
from tests.support.fakes import FakeEngine, FakeOutOfMemoryError

logger = structlog.get_logger("fault_engine")

CUDA_POISONED = "CUDA error: an illegal memory access was encountered"


class FaultEngine(FakeEngine):
    def __init__(
        self, *, step_seconds: float, stall_seconds: float, stall_gate: Path | None = None
    ) -> None:
        super().__init__(step_seconds=step_seconds)
        self.stall_seconds = stall_seconds
        self.stall_gate = stall_gate
        self._poisoned = False

    def generate(self, params: GenerationParams, hooks: StepHooks) -> GenerationResult:
        # The prompt of a test request is a label such as `queued-2`; this is a test engine, so
        # logging it is fine (the service itself does not log prompts by default).
        label = params.prompt
        steps_before = self.steps_run
        logger.info("engine_started", label=label, steps=params.num_inference_steps)
        if label.startswith("poison"):
            self._poisoned = True
            raise FakeOutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

        def on_progress(done: int, total: int) -> None:
            # Lets a test wait for a given step instead of guessing how long it takes.
            logger.info("engine_step", label=label, steps_done=done)
            hooks.on_progress(done, total)

        try:
            if label.startswith("stall"):
                self._stall()
            result = super().generate(params, replace(hooks, on_progress=on_progress))
        except ServiceError as exc:
            logger.info(
                "engine_stopped",
                label=label,
                steps_done=self.steps_run - steps_before,
                reason=type(exc).__name__,
            )
            raise
        except Exception:
            logger.info("engine_raised", label=label)
            raise
        logger.info("engine_finished", label=label, steps_done=self.steps_run - steps_before)
        return result

    def _stall(self) -> None:
        if self.stall_gate is None:
            time.sleep(self.stall_seconds)
            return
        give_up = time.monotonic() + 120  # a test that never opens the gate fails, not hangs
        while not self.stall_gate.exists() and time.monotonic() < give_up:
            time.sleep(0.01)

    def recover_from_oom(self) -> None:
        if self._poisoned:
            raise RuntimeError(CUDA_POISONED)
        super().recover_from_oom()
        logger.info("engine_recovered_from_oom", recoveries=self.oom_recoveries)


def main() -> int:
    settings = load_settings()
    configure_logging(settings.log_level)
    engine = FaultEngine(
        step_seconds=float(os.environ.get("FAKE_STEP_SECONDS", "0.01")),
        stall_seconds=float(os.environ.get("FAKE_STALL_SECONDS", "1.0")),
        stall_gate=Path(gate) if (gate := os.environ.get("FAKE_STALL_GATE")) else None,
    )
    app = create_app(settings, engine=engine)
    return run_server(app, settings, host=settings.host, port=settings.port)


if __name__ == "__main__":
    raise SystemExit(main())
