"""What the service adds on top of the pipeline: direct calls vs HTTP, side by side in one run.

    uv run python -m benchmarks.service_overhead [--model tiny] [--rounds 10]

Both columns use the same engine class and the same parameters; the HTTP column runs the real
`ovis-service` process (uvicorn, queue, inference thread, PNG encoding off-thread). The ratio
is what a client pays for the service itself. On a GPU host pass `--model` and `--device` to
measure the real architecture.
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from ovis_service.config import Settings
from ovis_service.engine import StepHooks
from ovis_service.imaging import encode_image
from ovis_service.pipeline import DiffusersEngine
from ovis_service.schemas import GenerationParams
from tests.support.service import run_service

CASES = [(256, 2), (512, 4), (1024, 2)]


def direct_seconds(engine: DiffusersEngine, size: int, steps: int, rounds: int) -> list[float]:
    timings = []
    for seed in range(rounds):
        params = GenerationParams(
            prompt="a red fox in the snow",
            negative_prompt="",
            num_inference_steps=steps,
            cfg_scale=5.0,
            width=size,
            height=size,
            seed=seed,
        )
        started = time.perf_counter()
        result = engine.generate(params, StepHooks(stop_check=lambda: None))
        encode_image(result.image, params, engine.model_id)
        timings.append(time.perf_counter() - started)
    return timings


def http_seconds(client: httpx.Client, size: int, steps: int, rounds: int) -> list[float]:
    timings = []
    for seed in range(rounds):
        body = {
            "prompt": "a red fox in the snow",
            "num_inference_steps": steps,
            "image_size": size,
            "seed": seed,
        }
        started = time.perf_counter()
        response = client.post("/generate", json=body)
        timings.append(time.perf_counter() - started)
        response.raise_for_status()
    return timings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    engine = DiffusersEngine(Settings(model=args.model, device=args.device))
    engine.load()
    direct_seconds(engine, 256, 2, 2)  # warm-up

    env = {"OVIS_MODEL": args.model, "OVIS_DEVICE": args.device}
    with (
        tempfile.TemporaryDirectory() as tmp,
        run_service(Path(tmp), env=env) as service,
        service.client(timeout=600) as client,
    ):
        http_seconds(client, 256, 2, 2)  # warm-up
        print(f"model={args.model} rounds={args.rounds} (median seconds per image)")
        print(f"{'size':>6} {'steps':>5} {'direct':>9} {'http':>9} {'http/direct':>12}")
        # Interleave the two columns per case so that machine noise hits both alike.
        for size, steps in CASES:
            direct = statistics.median(direct_seconds(engine, size, steps, args.rounds))
            http = statistics.median(http_seconds(client, size, steps, args.rounds))
            print(f"{size:>6} {steps:>5} {direct:>9.4f} {http:>9.4f} {http / direct:>12.3f}")
    engine.release()


if __name__ == "__main__":
    main()
