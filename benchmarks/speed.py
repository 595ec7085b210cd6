"""Every speed lever side by side in one run, against a plain `OvisImagePipeline.__call__`, and
the service's defaults under each memory budget (`benchmarks/budgets.py`).

    python -m benchmarks.speed --model full --out DIR --sections gpu-run   # one H100/H200, < 9 min
    python -m benchmarks.speed --model full --out DIR    # every section: longer than 9 minutes
    python -m benchmarks.speed --model tiny --out DIR    # the CPU, under 3 minutes (CI runs it)

`full` is Ovis-Image-7B's architecture from the configs in `ovis_service/pipeline/configs/` with
random bf16 weights made on the GPU: real shapes and so real speed, and nothing downloaded.
Images are 1024x1024 (256 for tiny), timed at a few steps and scaled to 50:
s/image = (text encode + VAE decode) + 50 x s/step. Writes `speed.json` and `speed.md` to DIR.

Each row is a `Scenario` (the service's own settings) on a fresh pipeline, set up the way the
service sets one up (`benchmarks/scenario.py`). Every section checks the time left
(`--budget-s`) and records itself as skipped rather than overrunning; the files are rewritten
after each section, so a cut-short run still reports.
"""

import argparse
import gc
import json
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import diffusers
import torch

from benchmarks import budgets as budget_sections
from benchmarks import measure
from benchmarks.architecture import parameter_count
from benchmarks.components import flops_and_floor, measure_parts
from benchmarks.report import write_markdown
from benchmarks.scenario import Scenario, build_pipeline, check, set_up
from ovis_service.config import SettingsError
from ovis_service.engine import StepHooks
from ovis_service.pipeline import loop
from ovis_service.pipeline.device import resolve_device, resolve_dtype
from ovis_service.pipeline.memory import pipeline_weights
from ovis_service.pipeline.prepare import Prepared
from ovis_service.pipeline.tiny import TINY_MODEL_ID
from ovis_service.schemas import GenerationParams

FULL_STEPS = 50
NO_HOOKS = StepHooks(stop_check=lambda: None)
PROMPT = "a red fox in the snow, golden hour, 35 mm photograph"


@dataclass(frozen=True, kw_only=True)
class Plan:
    """How much to measure, for one model size."""

    model: str
    size: int
    steps: int  # steps per timed run, scaled to FULL_STEPS
    cache_steps: int  # step caches skip by schedule, so they run (nearly) the real count
    repeats: int
    attention: tuple[str, ...]  # eager backends to compare; the fastest is compiled
    budget_s: float
    compile_needs_s: float  # skip the compile section with less time left than this
    fp8_needs_s: float  # fp8's first compile took 5 minutes on an H200
    matmul_size: int
    budget_steps: tuple[int, int]  # the two step counts of a steady-state measurement
    budget_needs_s: float  # one budget row: build, place, compile (warm cache), time
    thread_sizes: tuple[int, ...]
    thread_steps: int
    thread_images: int  # per thread
    threads_needs_s: float


PLANS = {
    "full": Plan(
        model="full",
        size=1024,
        steps=4,
        cache_steps=FULL_STEPS,
        repeats=2,
        attention=("auto", "cudnn", "torch_flash", "efficient"),
        budget_s=540,
        compile_needs_s=150,
        fp8_needs_s=320,
        matmul_size=8192,
        budget_steps=(2, 6),
        budget_needs_s=70,
        thread_sizes=(512, 1024),
        thread_steps=20,
        thread_images=2,
        threads_needs_s=120,
    ),
    "tiny": Plan(
        model=TINY_MODEL_ID,
        size=256,
        steps=4,
        cache_steps=8,
        repeats=2,
        attention=("auto", "math", "cudnn"),
        budget_s=170,
        compile_needs_s=60,
        fp8_needs_s=60,
        matmul_size=1024,
        budget_steps=(1, 3),
        budget_needs_s=20,
        thread_sizes=(128, 256),
        thread_steps=2,
        thread_images=1,
        threads_needs_s=15,
    ),
}

# The scenarios, in the service's own settings. The attention backends to compare come from the
# plan; compile and fp8 run with the fastest of them.
BASELINE = Scenario(name="diffusers __call__ (baseline)", diffusers_call=True)
CFG_SEQUENTIAL = Scenario(name="own loop, cfg sequential", cfg_batch=False)
SERVICE_DEFAULTS = Scenario(name="own loop, cfg batch")
STEP_CACHES = (
    Scenario(name="step cache taylorseer", step_cache="taylorseer"),
    Scenario(
        name="step cache first_block(threshold=0.05)",
        step_cache="first_block",
        step_cache_threshold=0.05,
    ),
)
OFFLOAD_MODES = tuple(
    Scenario(name=f"memory mode {mode}", offload=mode) for mode in ("none", "model", "sequential")
)


def with_attention(attention: str) -> Scenario:
    return replace(
        SERVICE_DEFAULTS,
        name=_with_backend(SERVICE_DEFAULTS.name, attention),
        attention=attention,
    )


def compiled_with(attention: str) -> Scenario:
    return Scenario(
        name=_with_backend("regional compile", attention),
        compile="regional",
        attention=attention,
        note="cfg batch",
    )


def fp8_compiled_with(attention: str) -> Scenario:
    return Scenario(
        name="fp8 + regional compile",
        quantize="fp8",
        compile="regional",
        attention=attention,
        note="best attention, cfg batch",
    )


def _with_backend(label: str, attention: str) -> str:
    return label if attention == SERVICE_DEFAULTS.attention else f"{label}, attention {attention}"


@dataclass
class Row:
    config: str
    lossless: bool
    steps_timed: int
    seconds_timed: float
    seconds_per_step: float
    seconds_per_image: float  # at FULL_STEPS
    peak_vram_gib: float | None
    note: str = ""


@dataclass
class Results:
    meta: dict[str, Any]
    components: dict[str, Any] = field(default_factory=dict)
    flops: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    compile: dict[str, Any] = field(default_factory=dict)
    memory: list[dict[str, Any]] = field(default_factory=list)
    budgets: list[dict[str, Any]] = field(default_factory=list)
    threads: list[dict[str, Any]] = field(default_factory=list)
    compile_modes: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


class Bench:
    """One model on the device the service would pick: the pipeline of the scenario in hand,
    the results so far and the time left."""

    def __init__(self, plan: Plan, out: Path) -> None:
        self.plan, self.out = plan, out
        self.device = resolve_device("auto", plan.model)
        self.dtype = resolve_dtype("auto", self.device)
        self.started = time.monotonic()
        self.results = Results(meta=_meta(plan, self.device, self.dtype))
        self.use(SERVICE_DEFAULTS)
        self.fastest_attention = SERVICE_DEFAULTS.attention
        self.results.meta["build_seconds"] = round(time.monotonic() - self.started, 1)
        self.results.meta["transformer_parameters"] = parameter_count(self.pipe.transformer)
        self.results.meta["text_encoder_parameters"] = parameter_count(self.pipe.text_encoder)

    # -- the pipeline ----------------------------------------------------------------------

    def use(self, scenario: Scenario, *, from_cpu: bool = False) -> None:
        """A fresh pipeline, set up for `scenario` as the service sets one up."""
        self.drop_pipeline()
        self.pipe, self.prepared = self.fresh(scenario, from_cpu=from_cpu)
        self.levers = self.prepared.levers
        self.scenario = scenario

    def fresh(self, scenario: Scenario, *, from_cpu: bool = False) -> tuple[Any, Prepared]:
        """A new pipeline set up for `scenario`. `from_cpu`: the weights are made on the device
        (fast) and moved to CPU memory before placement, as the service loads them, so that a
        budget caps only what the plan puts on the device."""
        pipe = build_pipeline(self.plan.model, self.device, self.dtype)
        if from_cpu and self.device.type == "cuda":
            pipe.to("cpu")
            measure.reset_peak_memory(self.device)
        return pipe, set_up(pipe, scenario, self.device)

    def drop_pipeline(self) -> None:
        """Free the last scenario's weights before making the next (two full-size copies would
        need twice the VRAM); compiled graphs hold the old weights too."""
        self.__dict__.pop("pipe", None)
        self.__dict__.pop("prepared", None)
        torch._dynamo.reset()
        gc.collect()
        measure.reset_peak_memory(self.device)

    def refused(self, scenario: Scenario) -> bool:
        """Skip, with the service's own message, a scenario the service would refuse here."""
        try:
            check(scenario, self.device, self.dtype)
        except SettingsError as exc:
            self.skip(f"{scenario.name}: {exc}")
            return True
        return False

    # -- bookkeeping -----------------------------------------------------------------------

    def left(self) -> float:
        return self.plan.budget_s - (time.monotonic() - self.started)

    def can(self, section: str, needs_s: float) -> bool:
        if self.left() >= needs_s:
            return True
        self.skip(f"{section}: {self.left():.0f} s left of the budget, needs about {needs_s:.0f}")
        return False

    def skip(self, why: str) -> None:
        print(f"skipped: {why}", flush=True)
        self.results.skipped.append(why)

    def save(self) -> None:
        data = asdict(self.results)
        (self.out / "speed.json").write_text(json.dumps(data, indent=2) + "\n")
        (self.out / "speed.md").write_text(write_markdown(data))

    # -- what is timed -----------------------------------------------------------------------

    def params(self, steps: int) -> GenerationParams:
        size = self.plan.size
        return GenerationParams(prompt=PROMPT, num_inference_steps=steps, width=size, height=size)

    def runner(self, steps: int) -> Callable[[], None]:
        """One image as the scenario in hand makes it. Reads `self.pipe` when called, so that
        a runner never keeps a dropped pipeline alive."""
        params = self.params(steps)
        if self.scenario.diffusers_call:
            return lambda: self._call_pipeline(params)
        return lambda: self._generate(params)

    def _generate(self, params: GenerationParams) -> None:
        self.make_image(self.pipe, self.prepared, params)

    @staticmethod
    def make_image(pipe: Any, prepared: Prepared, params: GenerationParams) -> None:
        try:
            with torch.inference_mode():
                loop.generate(pipe, params, NO_HOOKS, cfg_batch=prepared.levers.cfg_batch)
        finally:
            pipe.maybe_free_model_hooks()  # as the engine does: offloads, resets step caches

    def run_steps(self, steps: int) -> None:
        """One image of the scenario in hand at `steps` steps."""
        self.runner(steps)()

    def _call_pipeline(self, params: GenerationParams) -> None:
        with torch.inference_mode():
            loop.call_pipeline(self.pipe, params)

    def time(self, scenario: Scenario, *, warm: bool = True, repeats: int | None = None) -> Row:
        """Set up `scenario` and time it: one row of the table."""
        self.use(scenario)
        return self.row(warm=warm, repeats=repeats)

    def row(self, *, warm: bool = True, repeats: int | None = None) -> Row:
        """Time the scenario in hand, scaled to FULL_STEPS, and record it."""
        scenario = self.scenario
        steps = self.plan.cache_steps if scenario.step_cache != "none" else self.plan.steps
        run = self.runner(steps)
        if warm:
            run()  # kernels chosen, caches filled
        measure.reset_peak_memory(self.device)
        timed = measure.seconds(run, self.device, repeats or self.plan.repeats)
        fixed = self.results.components["text_encode_s"] + self.results.components["vae_decode_s"]
        per_step = max(timed - fixed, 0.0) / steps
        result = Row(
            config=scenario.name,
            lossless=scenario.lossless,
            steps_timed=steps,
            seconds_timed=round(timed, 4),
            seconds_per_step=round(per_step, 5),
            seconds_per_image=round(fixed + FULL_STEPS * per_step, 3),
            peak_vram_gib=measure.peak_memory_gib(self.device),
            note=f"timed at {steps} steps" if scenario.step_cache != "none" else scenario.note,
        )
        per_image = result.seconds_per_image
        print(f"{scenario.name}: {per_image} s/image ({timed:.3f} s for {steps} steps)", flush=True)
        self.results.rows.append(result)
        self.save()
        return result


def _meta(plan: Plan, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    return {
        "model": plan.model,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {os.cpu_count()} cores",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "size": plan.size,
        "steps_timed": plan.steps,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


# -- sections ------------------------------------------------------------------------------------


def components(bench: Bench) -> None:
    """Text encode, VAE decode and one transformer forward, each timed alone; FLOPs and floor."""
    bench.use(SERVICE_DEFAULTS)
    parts = measure_parts(bench.pipe, bench.params(1), bench.device, 3 * bench.plan.repeats)
    bench.results.components.update(parts.seconds)
    peak = measure.matmul_tflops(bench.device, bench.dtype, bench.plan.matmul_size, 20)
    bench.results.flops = flops_and_floor(
        bench.pipe.transformer.config, parts, steps=FULL_STEPS, peak_tflops=peak
    )
    print("components", bench.results.components, bench.results.flops, flush=True)
    bench.save()


def eager(bench: Bench) -> None:
    """Baseline, guidance batching and attention backends; remembers the fastest backend."""
    for scenario in (BASELINE, CFG_SEQUENTIAL):
        bench.time(scenario)
    timings: dict[str, float] = {}
    for attention in bench.plan.attention:
        scenario = with_attention(attention)
        if not bench.refused(scenario):
            timings[attention] = bench.time(scenario).seconds_per_image
    bench.fastest_attention = min(
        timings, key=timings.__getitem__, default=SERVICE_DEFAULTS.attention
    )


def caches(bench: Bench) -> None:
    for scenario in STEP_CACHES:
        needs_s = 2 * bench.plan.cache_steps * bench.results.rows[-1].seconds_per_step + 5
        if bench.can(scenario.name, needs_s):
            # Kernels are warm from the rows before: one run at the real step count.
            bench.time(scenario, warm=False, repeats=1)


def compiled(bench: Bench) -> None:
    """Regional compile with the fastest backend, and what compiling costs, cold and warm."""
    scenario = compiled_with(bench.fastest_attention)
    if bench.refused(scenario) or not bench.can(scenario.name, bench.plan.compile_needs_s):
        return
    bench.use(scenario)
    steps, device, costs = bench.plan.steps, bench.device, bench.results.compile
    costs["cold_first_call_s"] = round(measure.seconds(bench.runner(steps), device), 2)
    row = bench.row()
    costs["cold_compile_s"] = round(costs["cold_first_call_s"] - row.seconds_timed, 2)
    torch._dynamo.reset()  # forget the graphs; inductor's on-disk cache stays
    warm_call = measure.seconds(bench.runner(steps), device)
    costs["warm_compile_s"] = round(warm_call - row.seconds_timed, 2)
    bench.save()


def memory(bench: Bench) -> None:
    """Peak VRAM and time of one step in each memory mode (`OVIS_OFFLOAD`)."""
    if bench.device.type != "cuda":
        bench.skip("memory modes: offload needs CUDA")
        return
    if not bench.can("memory modes", 90):
        return
    for scenario in OFFLOAD_MODES:
        if not bench.can(scenario.name, 30):
            break
        bench.use(scenario)
        if scenario.offload == "none":
            _note_vram_left_over(bench)
            bench.runner(1)()  # warm, with every weight on the GPU
        measure.reset_peak_memory(bench.device)
        elapsed = measure.seconds(bench.runner(1), bench.device)
        bench.results.memory.append(
            {
                "mode": scenario.offload,
                "peak_vram_gib": measure.peak_memory_gib(bench.device),
                "seconds_1_step": round(elapsed, 2),
            }
        )
        print("memory", bench.results.memory[-1], flush=True)
        bench.save()


def _note_vram_left_over(bench: Bench) -> None:
    """What the sections before left allocated beyond a fresh pipeline's weights."""
    weights = pipeline_weights(bench.pipe).total_bytes
    left_over = torch.cuda.memory_allocated(bench.device) - weights
    bench.results.meta["vram_left_over_gib"] = round(left_over / 2**30, 2)


def fp8(bench: Bench) -> None:
    """fp8 with regional compile: fresh weights, quantised, then compiled, as the service does."""
    scenario = fp8_compiled_with(bench.fastest_attention)
    if bench.refused(scenario) or not bench.can(scenario.name, bench.plan.fp8_needs_s):
        return
    bench.use(scenario)
    started = measure.seconds(bench.runner(bench.plan.steps), bench.device)
    row = bench.row()
    bench.results.compile["fp8_cold_compile_s"] = round(started - row.seconds_timed, 2)
    bench.save()


SECTIONS: dict[str, Callable[[Bench], None]] = {
    "components": components,
    "eager": eager,
    "caches": caches,
    "compile": compiled,
    "budgets": budget_sections.budgets,
    "threads": budget_sections.threads,
    "compile_modes": budget_sections.compile_modes,
    "memory": memory,
    "fp8": fp8,  # the longest compile: last, so a short budget cuts only it
}
# The one GPU command (docs/performance.md): what the memory-budget work needs measured, inside
# 9 minutes on an H200. The eager levers, caches, memory modes and fp8 were measured before.
PRESETS = {"gpu-run": ("components", "compile", "budgets", "threads", "compile_modes")}


def run(plan: Plan, out: Path, sections: tuple[str, ...] = tuple(SECTIONS)) -> Results:
    out.mkdir(parents=True, exist_ok=True)
    bench = Bench(plan, out)
    print(f"built {plan.model} in {bench.results.meta['build_seconds']} s", flush=True)
    for name, section in SECTIONS.items():
        if name not in sections:
            continue
        try:
            section(bench)
        except Exception as exc:  # one broken lever must not cost the rest of a GPU run
            traceback.print_exc()
            bench.results.failed.append(f"{name}: {type(exc).__name__}: {str(exc)[:300]}")
            bench.save()
    bench.results.meta["total_seconds"] = round(time.monotonic() - bench.started, 1)
    bench.save()
    return bench.results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(PLANS), default="full")
    parser.add_argument("--out", type=Path, default=Path("benchmark-results"))
    parser.add_argument("--budget-s", type=float, help="stop starting sections after this")
    parser.add_argument("--steps", type=int, help="steps per timed run (scaled to 50)")
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help="comma list of sections to run, or a preset: "
        + ", ".join(f"{name} = {','.join(sections)}" for name, sections in PRESETS.items())
        + "; rows need components (default: all)",
    )
    args = parser.parse_args(argv)
    if args.model != TINY_MODEL_ID and not torch.cuda.is_available():
        parser.error(f"--model {args.model} needs a CUDA device; --model tiny runs on the CPU")
    plan = PLANS[args.model]
    if args.budget_s:
        plan = replace(plan, budget_s=args.budget_s)
    if args.steps:
        plan = replace(plan, steps=args.steps)
    sections = PRESETS.get(args.sections) or tuple(args.sections.split(","))
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    results = run(plan, args.out, sections)
    print((args.out / "speed.md").read_text())
    if results.skipped:
        print("skipped:", *results.skipped, sep="\n  ")
    if results.failed:
        print("FAILED:", *results.failed, sep="\n  ")
    return 1 if results.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
