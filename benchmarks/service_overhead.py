"""What the service adds on top of the pipeline: direct calls vs HTTP, side by side in one run.

    uv run python -m benchmarks.service_overhead [--model tiny] [--rounds 10]

Both columns use the same engine class, settings and parameters; the HTTP column runs the real
`ovis-service` process (uvicorn, queue, inference thread, PNG encoding off-thread). The ratio
is what a client pays for the service itself. On a GPU host pass `--model` and `--device` to
measure the real architecture.
"""

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from ovis_service.config import ENV_PREFIX, Settings
from ovis_service.engine import EngineInfo, StepHooks
from ovis_service.imaging import encode_image
from ovis_service.model_source import public_model_name
from ovis_service.pipeline import DiffusersEngine
from ovis_service.schemas import GenerationParams

CASES = [(256, 2), (512, 4), (1024, 2)]
READY_TIMEOUT_S = 600  # a full-size model loads for minutes; the tiny one in seconds


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


@contextmanager
def running_service(settings: Settings) -> Iterator[httpx.Client]:
    """`ovis-service` in its own process on a free loopback port, with `settings` and nothing
    else: no inherited `OVIS_*` variable, and an empty directory so that no `.env` applies.
    SIGTERM at the end, as `docker stop` sends."""
    port = _free_port()
    environ = {key: value for key, value in os.environ.items() if not key.startswith(ENV_PREFIX)}
    environ.update({"OVIS_MODEL": settings.model, "OVIS_DEVICE": settings.device})  # all we vary
    command = [sys.executable, "-m", "ovis_service", "--host", "127.0.0.1", "--port", str(port)]
    with tempfile.TemporaryDirectory() as directory:
        log_path = Path(directory) / "service.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(command, cwd=directory, env=environ, stdout=log, stderr=log)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
                _wait_until_ready(client, process, log_path)
                yield client
        finally:
            _stop(process, settings.drain_timeout + 30)


def _stop(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_until_ready(
    client: httpx.Client, process: subprocess.Popen[bytes], log_path: Path
) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ovis-service exited early:\n{log_path.read_text()[-3000:]}")
        try:
            if client.get("/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.2)
    raise TimeoutError(f"ovis-service not ready after {READY_TIMEOUT_S} s")


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

    with running_service(settings) as client:
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
