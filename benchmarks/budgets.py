"""The speed benchmark's sections for memory budgets, inference threads and compile modes.

- `budgets`: for each emulated card size, the service's defaults (`OVIS_OFFLOAD=auto`,
  `OVIS_COMPILE=auto`) under `OVIS_GPU_MEMORY` itself: the plan `auto` picks, its peak VRAM and
  the warm steady-state seconds per image, against the resident (unlimited) row and the floor.
- `threads`: images per minute with one and with two inference threads on one device.
- `compile_modes`: regional compile with static shapes and with CUDA graphs, against the
  service's dynamic-shape compile; a mode is worth a setting only where it wins.

Steady state: a warm-up run (compiles, fills caches), then the best of `repeats` runs at two step
counts; the difference gives seconds per step, the rest the fixed part (text encode, transfers,
VAE decode), and s/image = fixed + 50 x s/step.
"""

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from benchmarks import measure
from benchmarks.scenario import Scenario
from ovis_service.config import Settings
from ovis_service.pipeline import budget, levers
from ovis_service.pipeline.memory import GIB, activation_headroom, choose_plan
from ovis_service.schemas import GenerationParams

if TYPE_CHECKING:
    from benchmarks.speed import Bench

FULL_STEPS = 50
_SERVICE = Settings()
BUDGETS_GIB: tuple[int | None, ...] = (None, 24, 16, 12, 8)  # None: no OVIS_GPU_MEMORY
CUDA_ONLY = "emulating a card size needs CUDA (OVIS_GPU_MEMORY caps GPU memory)"


def steady_state(
    run: Callable[[int], None], device: torch.device, steps: tuple[int, int], repeats: int
) -> dict[str, float]:
    """Seconds per image at FULL_STEPS from the best runs at two step counts, after a warm-up."""
    short, long = steps
    run(short)  # warm-up: compiles, chooses kernels, fills the allocator
    short_s = measure.seconds(lambda: run(short), device, repeats)
    long_s = measure.seconds(lambda: run(long), device, repeats)
    per_step = max(long_s - short_s, 0.0) / (long - short)
    fixed = max(short_s - short * per_step, 0.0)
    return {
        "seconds_per_image": round(fixed + FULL_STEPS * per_step, 3),
        "fixed_s": round(fixed, 3),
        "seconds_per_step": round(per_step, 5),
    }


def budget_scenario(gib: int | None, size: int) -> Scenario:
    """The service's defaults on a card of `gib` GiB, for images up to `size`."""
    return Scenario(
        name=f"{gib} GiB" if gib else "unlimited",
        compile=_SERVICE.compile,
        offload=_SERVICE.offload,
        gpu_memory=f"{gib}GiB" if gib else "",
        max_image_size=size,
    )


def budgets(bench: "Bench") -> None:
    if bench.device.type != "cuda":
        bench.skip(
            f"budgets: {CUDA_ONLY}; plan selection is unit-tested with fake sizes "
            "(tests/pipeline/test_memory.py)"
        )
        return
    try:
        for gib in BUDGETS_GIB:
            scenario = budget_scenario(gib, bench.plan.size)
            if not bench.can(f"budget {scenario.name}", bench.plan.budget_needs_s):
                break
            _one_budget(bench, scenario, gib)
    finally:
        bench.drop_pipeline()
        budget.forget()  # later sections run uncapped


def _one_budget(bench: "Bench", scenario: Scenario, gib: int | None) -> None:
    budget.forget()  # worked out afresh, and enforced, for this card size
    row: dict[str, Any] = {"budget": scenario.name}
    try:
        bench.use(scenario, from_cpu=True)
        prepared = bench.prepared
        sizes = prepared.placement.sizes
        at_largest = choose_plan(
            "auto",
            sizes,
            on_cuda=True,
            budget_bytes=prepared.placement.budget_bytes,
            headroom_bytes=activation_headroom(_SERVICE.max_image_size),
        )
        row |= {
            "plan": prepared.placement.describe(),
            "compile": prepared.levers.compile,
            "plan_needs_gib": round(prepared.placement.plan.needs_bytes / GIB, 2),
            "plan_at_max_2048": at_largest.offload if at_largest else "refused",
        }
        measure.reset_peak_memory(bench.device)
        row |= steady_state(bench.run_steps, bench.device, bench.plan.budget_steps, 2)
        row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(bench.device) / GIB, 2)
        row["peak_allocated_gib"] = measure.peak_memory_gib(bench.device)
        row["under_budget"] = gib is None or row["peak_reserved_gib"] <= gib
    except torch.OutOfMemoryError as exc:
        # A plan that runs out of memory under its own budget is the bug this section hunts.
        row["error"] = f"out of memory: {str(exc).splitlines()[0][:200]}"
        bench.results.failed.append(f"budget {scenario.name}: {row['error']}")
    except Exception as exc:  # one card size that fails must not cost the others
        row["error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
        bench.results.failed.append(f"budget {scenario.name}: {row['error']}")
    _add_ratios(bench, row)
    print("budget", row, flush=True)
    bench.results.budgets.append(row)
    bench.save()


def _add_ratios(bench: "Bench", row: dict[str, Any]) -> None:
    image_s = row.get("seconds_per_image")
    resident = next((r for r in bench.results.budgets if r["budget"] == "unlimited"), row)
    floor = bench.results.flops.get("floor_s_per_image")
    if image_s and resident.get("seconds_per_image"):
        row["x_resident"] = round(image_s / resident["seconds_per_image"], 2)
    if image_s and floor:
        row["x_floor"] = round(image_s / floor, 2)


def threads(bench: "Bench") -> None:
    """One vs two inference threads on one device, each with its own pipeline (as
    `OVIS_WORKERS=2` runs them), the service's defaults otherwise."""
    plan = bench.plan
    if not bench.can("threads", plan.threads_needs_s):
        return
    bench.drop_pipeline()
    scenario = Scenario(
        name="threads", compile=_SERVICE.compile, offload=_SERVICE.offload, workers=2
    )
    copies = [bench.fresh(scenario) for _ in range(2)]
    try:
        for size in plan.thread_sizes:
            params = GenerationParams(
                prompt="a harbour at night",
                num_inference_steps=plan.thread_steps,
                width=size,
                height=size,
            )
            for pipe, prepared in copies:  # compile and kernels warm, one copy at a time
                bench.make_image(pipe, prepared, params)
            row: dict[str, Any] = {"size": size, "steps": plan.thread_steps}
            for count in (1, 2):
                wall = _concurrently(bench, copies[:count], params, plan.thread_images)
                row[f"images_per_min_{count}"] = round(60 * count * plan.thread_images / wall, 2)
            row["two_vs_one"] = round(row["images_per_min_2"] / row["images_per_min_1"], 2)
            print("threads", row, flush=True)
            bench.results.threads.append(row)
            bench.save()
    finally:
        copies.clear()
        bench.drop_pipeline()


def _concurrently(
    bench: "Bench", copies: list[Any], params: GenerationParams, images: int
) -> float:
    """Wall seconds for each copy to make `images` images, each copy on its own thread."""

    def work(pipe: Any, prepared: Any) -> None:
        for _ in range(images):
            bench.make_image(pipe, prepared, params)

    workers = [threading.Thread(target=work, args=copy) for copy in copies]
    measure.synchronize(bench.device)
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    measure.synchronize(bench.device)
    return time.perf_counter() - started


COMPILE_MODES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("regional, dynamic shapes (the service)", {"dynamic": True, "mode": None}),
    ("regional, static shapes", {"dynamic": False, "mode": None}),
    ("regional, static shapes + CUDA graphs", {"dynamic": False, "mode": "reduce-overhead"}),
)


def compile_modes(bench: "Bench") -> None:
    """Resident weights, eager levers otherwise; each mode compiled afresh at the benchmark's
    image size. A mode other than the service's is kept only if it wins."""
    if bench.device.type != "cuda":
        bench.skip("compile modes: CUDA graphs need CUDA, and a CPU compile per mode takes minutes")
        return
    for label, options in COMPILE_MODES:
        if not bench.can(f"compile mode {label}", bench.plan.compile_needs_s):
            break
        row: dict[str, Any] = {"mode": label}
        try:
            bench.use(Scenario(name=label, compile="none"))
            levers.compile_blocks(bench.pipe.transformer, **options)
            started = time.perf_counter()
            bench.run_steps(bench.plan.steps)
            row["first_call_s"] = round(time.perf_counter() - started, 1)
            row |= steady_state(bench.run_steps, bench.device, bench.plan.budget_steps, 2)
        except Exception as exc:  # one mode that cannot run must not cost the others
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        service = bench.results.compile_modes[0] if bench.results.compile_modes else row
        if "seconds_per_image" in row and "seconds_per_image" in service:
            row["vs_service"] = round(service["seconds_per_image"] / row["seconds_per_image"], 3)
        print("compile mode", row, flush=True)
        bench.results.compile_modes.append(row)
        bench.save()
    bench.drop_pipeline()
