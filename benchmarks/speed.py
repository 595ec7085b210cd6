"""Every speed lever side by side in one run, against a plain `OvisImagePipeline.__call__`.

    python -m benchmarks.speed --model full --out DIR    # one H100/H200: about 6 minutes
    python -m benchmarks.speed --model tiny --out DIR    # the CPU, under 3 minutes (CI runs it)

`full` is Ovis-Image-7B's architecture from the configs in `ovis_service/pipeline/configs/` with
random bf16 weights made on the GPU: real shapes and so real speed, and nothing downloaded.
Images are 1024x1024 (512 for tiny), timed at a few steps and scaled to 50:
s/image = (text encode + VAE decode) + 50 x s/step. Writes `speed.json` and `speed.md` to DIR.
Every section checks the time left (`--budget-s`) and records itself as skipped rather than
overrunning; the files are rewritten after each section, so a cut-short run still reports.
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
from diffusers import FirstBlockCacheConfig, OvisImagePipeline, TaylorSeerCacheConfig

from benchmarks import measure
from benchmarks.architecture import build_full_size_pipeline, parameter_count
from benchmarks.report import write_markdown
from ovis_service.config import SettingsError
from ovis_service.engine import StepHooks
from ovis_service.pipeline import levers, loop
from ovis_service.pipeline.tiny import build_tiny_pipeline
from ovis_service.schemas import GenerationParams

FULL_STEPS = 50
NO_HOOKS = StepHooks(stop_check=lambda: None)


@dataclass(frozen=True)
class Plan:
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


PLANS = {
    "full": Plan(
        "full",
        1024,
        4,
        FULL_STEPS,
        2,
        ("native", "cudnn", "torch_flash", "efficient"),
        480,
        150,
        320,
        8192,
    ),
    "tiny": Plan("tiny", 256, 4, 8, 2, ("native", "math", "cudnn"), 170, 60, 60, 1024),
}


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
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


class Bench:
    def __init__(self, plan: Plan, device: torch.device, dtype: torch.dtype, out: Path) -> None:
        self.plan, self.device, self.dtype, self.out = plan, device, dtype, out
        self.started = time.monotonic()
        self.results = Results(meta=self._meta())
        self.pipe = self._build()
        self.best_attention = "native"
        self.results.meta["build_seconds"] = round(time.monotonic() - self.started, 1)
        self.results.meta["transformer_parameters"] = parameter_count(self.pipe.transformer)
        self.results.meta["text_encoder_parameters"] = parameter_count(self.pipe.text_encoder)

    def _meta(self) -> dict[str, Any]:
        cuda = self.device.type == "cuda"
        return {
            "model": self.plan.model,
            "device": torch.cuda.get_device_name(self.device)
            if cuda
            else f"CPU, {os.cpu_count()} cores",
            "dtype": str(self.dtype).removeprefix("torch."),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "size": self.plan.size,
            "steps_timed": self.plan.steps,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }

    def _build(self) -> OvisImagePipeline:
        if self.plan.model == "tiny":
            pipe = build_tiny_pipeline().to(self.device)
        else:
            pipe = build_full_size_pipeline(self.device, self.dtype)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _rebuild(self) -> None:
        """Plain weights again, after dropping the compiled graphs, which hold the old ones."""
        del self.pipe
        torch._dynamo.reset()
        gc.collect()
        measure.reset_peak_memory(self.device)
        self.pipe = self._build()

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

    def params(self, steps: int, cfg: float = 5.0) -> GenerationParams:
        size = self.plan.size
        return GenerationParams(
            prompt="a red fox in the snow, golden hour, 35 mm photograph",
            negative_prompt="",
            num_inference_steps=steps,
            cfg_scale=cfg,
            width=size,
            height=size,
            seed=0,
        )

    def ours(self, steps: int, *, cfg_batch: bool = True) -> Callable[[], Any]:
        def run() -> None:
            try:
                with torch.inference_mode():
                    loop.generate(self.pipe, self.params(steps), NO_HOOKS, cfg_batch=cfg_batch)
            finally:
                self.pipe.maybe_free_model_hooks()  # also resets step-cache state

        return run

    def diffusers_call(self, steps: int) -> Callable[[], Any]:
        p = self.params(steps)

        def run() -> None:
            with torch.inference_mode():
                loop.call_pipeline(self.pipe, p)

        return run

    def row(
        self,
        config: str,
        run: Callable[[], Any],
        steps: int,
        *,
        lossless: bool,
        note: str = "",
        warm: bool = True,
        repeats: int | None = None,
    ) -> Row:
        if warm:
            run()  # kernels chosen, caches filled
        measure.reset_peak_memory(self.device)
        timed = measure.seconds(run, self.device, repeats or self.plan.repeats)
        fixed = self.results.components["text_encode_s"] + self.results.components["vae_decode_s"]
        per_step = max(timed - fixed, 0.0) / steps
        result = Row(
            config=config,
            lossless=lossless,
            steps_timed=steps,
            seconds_timed=round(timed, 4),
            seconds_per_step=round(per_step, 5),
            seconds_per_image=round(fixed + FULL_STEPS * per_step, 3),
            peak_vram_gib=measure.peak_memory_gib(self.device),
            note=note,
        )
        print(
            f"{config}: {result.seconds_per_image} s/image ({timed:.3f} s for {steps} steps)",
            flush=True,
        )
        self.results.rows.append(result)
        self.save()
        return result

    # -- sections ------------------------------------------------------------------------------

    def components(self) -> None:
        pipe, device, p = self.pipe, self.device, self.params(1)
        with torch.inference_mode():
            cond = loop.encode(pipe, p, device)
            latents, image_ids = pipe.prepare_latents(
                2,
                pipe.transformer.config.in_channels // 4,
                p.height,
                p.width,
                cond.embeds.dtype,
                device,
                torch.Generator("cpu").manual_seed(0),
            )
            embeds = torch.cat([cond.embeds, cond.embeds])

            def forward(batch: int) -> Callable[[], Any]:
                return lambda: pipe.transformer(
                    hidden_states=latents[:batch],
                    timestep=torch.full((batch,), 0.5, device=device, dtype=latents.dtype),
                    encoder_hidden_states=embeds[:batch],
                    txt_ids=cond.text_ids,
                    img_ids=image_ids,
                    return_dict=False,
                )

            repeats = 3 * self.plan.repeats
            for warm in (lambda: loop.encode(pipe, p, device), forward(1), forward(2)):
                warm()
            c = self.results.components
            c["text_encode_s"] = measure.seconds(
                lambda: loop.encode(pipe, p, device), device, repeats
            )
            c["vae_decode_s"] = measure.seconds(
                lambda: loop.decode(pipe, latents[:1], p.width, p.height), device, repeats
            )
            c["forward_batch1_s"] = measure.seconds(forward(1), device, repeats)
            c["forward_batch2_s"] = measure.seconds(forward(2), device, repeats)
            counted, counted_attention = measure.count_flops(forward(1))
        config = pipe.transformer.config
        tokens = latents.shape[1] + cond.embeds.shape[1]
        by_hand = measure.attention_flops(
            config.num_attention_heads,
            config.attention_head_dim,
            tokens,
            config.num_layers + config.num_single_layers,
        )
        per_forward = counted - counted_attention + by_hand
        per_image = per_forward * 2 * FULL_STEPS  # guidance: cond and uncond every step
        peak = measure.matmul_tflops(device, self.dtype, self.plan.matmul_size, 20)
        self.results.flops = {
            "tokens": tokens,
            "counted_tflop_per_forward": _sig(counted / 1e12),
            "counted_attention_tflop": _sig(counted_attention / 1e12),
            "attention_by_hand_tflop": _sig(by_hand / 1e12),
            "tflop_per_forward": _sig(per_forward / 1e12),
            "pflop_per_image": _sig(per_image / 1e15),
            "matmul_tflops_measured": _sig(peak),
            "floor_s_per_image": _sig(per_image / (peak * 1e12)),
            "forward_batch1_x_floor": _sig(c["forward_batch1_s"] / (per_forward / (peak * 1e12))),
        }
        print("components", c, self.results.flops, flush=True)
        self.save()

    def eager(self) -> None:
        """Baseline, guidance batching and attention backends; remembers the fastest backend."""
        s = self.plan.steps
        self.row("diffusers __call__ (baseline)", self.diffusers_call(s), s, lossless=True)
        self.row("own loop, cfg sequential", self.ours(s, cfg_batch=False), s, lossless=True)
        timings: dict[str, float] = {}
        for name in self.plan.attention:
            try:
                levers.check(levers.Levers(attention=name), self.device, self.dtype)
            except SettingsError as exc:
                self.skip(f"attention {name}: {exc}")
                continue
            self.pipe.transformer.set_attention_backend(levers.ATTENTION_BACKENDS[name])
            label = "own loop, cfg batch" + ("" if name == "native" else f", attention {name}")
            timings[name] = self.row(label, self.ours(s), s, lossless=True).seconds_per_image
        self.pipe.transformer.set_attention_backend(levers.ATTENTION_BACKENDS["native"])
        self.best_attention = min(timings, key=timings.__getitem__)

    def caches(self) -> None:
        steps = self.plan.cache_steps
        transformer = self.pipe.transformer
        levers.register_ovis_blocks()
        for name, config in (
            ("taylorseer", TaylorSeerCacheConfig(taylor_factors_dtype=self.dtype)),
            ("first_block(threshold=0.05)", FirstBlockCacheConfig(threshold=0.05)),
        ):
            if not self.can(
                f"step cache {name}", 2 * steps * self.results.rows[-1].seconds_per_step + 5
            ):
                continue
            transformer.enable_cache(config)
            try:
                self.row(
                    f"step cache {name}",
                    self.ours(steps),
                    steps,
                    lossless=False,
                    note=f"timed at {steps} steps",
                    # Kernels are warm from the rows before: one run at the real step count.
                    warm=False,
                    repeats=1,
                )
            finally:
                transformer.disable_cache()

    def memory(self) -> None:
        if self.device.type != "cuda":
            self.skip("memory modes: offload needs CUDA")
            return
        if not self.can("memory modes", 90):
            return
        self._rebuild()  # compile changed the transformer in place
        self.results.meta["vram_left_over_gib"] = round(
            (torch.cuda.memory_allocated() - _weights_bytes(self.pipe)) / 2**30, 2
        )
        self.ours(1)()  # warm
        for mode in ("none", "model", "sequential"):
            if not self.can(f"memory mode {mode}", 30):
                break
            if mode == "model":
                self.pipe.to("cpu")
                self.pipe.enable_model_cpu_offload(device=self.device)
            elif mode == "sequential":
                self.pipe.remove_all_hooks()
                self.pipe.enable_sequential_cpu_offload(device=self.device)
            measure.reset_peak_memory(self.device)
            elapsed = measure.seconds(self.ours(1), self.device)
            self.results.memory.append(
                {
                    "mode": mode,
                    "peak_vram_gib": measure.peak_memory_gib(self.device),
                    "seconds_1_step": round(elapsed, 2),
                }
            )
            print("memory", self.results.memory[-1], flush=True)
            self.save()
        self.pipe.remove_all_hooks()

    def compiled(self) -> None:
        attention = self.best_attention
        if not self.can("regional compile", self.plan.compile_needs_s):
            return
        s = self.plan.steps
        levers.apply(self.pipe, levers.Levers(compile="regional", attention=attention))
        self.results.compile["cold_first_call_s"] = round(
            measure.seconds(self.ours(s), self.device), 2
        )
        label = "regional compile" + ("" if attention == "native" else f", attention {attention}")
        row = self.row(label, self.ours(s), s, lossless=True, note="cfg batch")
        self.results.compile["cold_compile_s"] = round(
            self.results.compile["cold_first_call_s"] - row.seconds_timed, 2
        )
        torch._dynamo.reset()  # forget the graphs; inductor's on-disk cache stays
        warm_call = measure.seconds(self.ours(s), self.device)
        self.results.compile["warm_compile_s"] = round(warm_call - row.seconds_timed, 2)
        self.save()

    def fp8(self) -> None:
        try:
            levers.check(levers.Levers(quantize="fp8"), self.device, self.dtype)
        except SettingsError as exc:
            self.skip(f"fp8: {exc}")
            return
        if not self.can("fp8 + regional compile", self.plan.fp8_needs_s):
            return
        s = self.plan.steps
        # Fresh weights, set up the way the service does it: quantise, attention, compile.
        self._rebuild()
        fp8 = levers.Levers(quantize="fp8", compile="regional", attention=self.best_attention)
        levers.apply(self.pipe, fp8)
        started = measure.seconds(self.ours(s), self.device)
        row = self.row(
            "fp8 + regional compile",
            self.ours(s),
            s,
            lossless=False,
            note="best attention, cfg batch",
        )
        self.results.compile["fp8_cold_compile_s"] = round(started - row.seconds_timed, 2)
        self.save()


def _weights_bytes(pipe: OvisImagePipeline) -> int:
    modules = (pipe.transformer, pipe.text_encoder, pipe.vae)
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def _sig(value: float) -> float:
    """Four significant digits: the tiny model's FLOPs are a million times the full one's."""
    return float(f"{value:.4g}")


SECTIONS = ("components", "eager", "caches", "compile", "memory", "fp8")


def run(plan: Plan, out: Path, sections: tuple[str, ...] = SECTIONS) -> Results:
    out.mkdir(parents=True, exist_ok=True)
    cuda = plan.model == "full" or torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    bench = Bench(plan, device, dtype, out)
    print(f"built {plan.model} in {bench.results.meta['build_seconds']} s", flush=True)
    for name, section in (
        ("components", bench.components),
        ("eager", bench.eager),
        ("caches", bench.caches),
        ("compile", bench.compiled),
        ("memory", bench.memory),
        ("fp8", bench.fp8),  # the longest compile: last, so a short budget cuts only it
    ):
        if name not in sections:
            continue
        try:
            section()
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
        help="comma list of sections to run; rows need components (default: all)",
    )
    args = parser.parse_args(argv)
    plan = PLANS[args.model]
    if args.budget_s:
        plan = replace(plan, budget_s=args.budget_s)
    if args.steps:
        plan = replace(plan, steps=args.steps)
    results = run(plan, args.out, tuple(args.sections.split(",")))
    print((args.out / "speed.md").read_text())
    if results.skipped:
        print("skipped:", *results.skipped, sep="\n  ")
    if results.failed:
        print("FAILED:", *results.failed, sep="\n  ")
    return 1 if results.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
