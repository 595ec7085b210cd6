"""What the service adds on top of the pipeline: direct calls vs HTTP, side by side in one run.

    uv run python -m benchmarks.service_overhead [--model tiny] [--rounds 10]

Both columns use the same engine class, settings and parameters; the HTTP column runs the real
`ovis-service` process (uvicorn, queue, inference thread, PNG encoding off-thread). The ratio
is what a client pays for the service itself. On a GPU host pass `--model` and `--device` to
measure the real architecture.
"""

import argparse
import os
import statistics
import time

import httpx

from benchmarks.local_service import running_service
from ovis_service.config import Settings
from ovis_service.engine import EngineInfo, StepHooks
from ovis_service.imaging import encode_image
from ovis_service.model_source import public_model_name
from ovis_service.pipeline import DiffusersEngine
from ovis_service.schemas import GenerationParams

CASES = [(256, 2), (512, 4), (1024, 2)]


def direct_seconds(
    engine: DiffusersEngine, info: EngineInfo, size: int, steps: int, rounds: int
) -> list[float]:
    """Generate and encode a PNG as the service does, without HTTP, queue or threads."""
    model_name = public_model_name(engine.model_id)
    timings = []
    for seed in range(rounds):
        params = GenerationParams(
            prompt="a red fox in the snow",
            num_inference_steps=steps,
            width=size,
            height=size,
            seed=seed,
        )
        started = time.perf_counter()
        result = engine.generate(params, StepHooks(stop_check=lambda: None))
        encode_image(result.image, params, model_name, levers=info.levers)
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

    settings = Settings(model=args.model, device=args.device)
    engine = DiffusersEngine(settings)
    info = engine.load()
    direct_seconds(engine, info, 256, 2, 2)  # warm-up

    with running_service(
        {"OVIS_MODEL": settings.model, "OVIS_DEVICE": settings.device},  # all we vary
        stop_timeout_s=settings.drain_timeout + 30,
    ) as client:
        http_seconds(client, 256, 2, 2)  # warm-up
        print(f"model={args.model} rounds={args.rounds} (median seconds per image)")
        print(f"{'size':>6} {'steps':>5} {'direct':>9} {'http':>9} {'http/direct':>12}")
        # Interleave the two columns per case so that machine noise hits both alike.
        for size, steps in CASES:
            direct = statistics.median(direct_seconds(engine, info, size, steps, args.rounds))
            http = statistics.median(http_seconds(client, size, steps, args.rounds))
            print(f"{size:>6} {steps:>5} {direct:>9.4f} {http:>9.4f} {http / direct:>12.3f}")
    engine.release()


if __name__ == "__main__":
    main()
