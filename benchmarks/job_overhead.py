"""What a job costs over a synchronous request for the same image, side by side in one run.

    uv run python -m benchmarks.job_overhead [--model tiny] [--devices cpu] [--rounds 10]
        [--size 256] [--steps 2] [--out job_overhead.json]

It starts `ovis-service` itself (its own process, on a free loopback port, with an empty working
directory so that its SQLite job store starts empty and no `.env` applies), then times the same
image (same prompt, seed, size and steps) three ways, interleaved round by round so that
machine noise hits every column alike:

- sync:   `POST /generate`, the PNG in the answer;
- events: `POST /generate` with `Prefer: respond-async` (202), `GET /jobs/{id}/events` until
  `done`, then the image from its URL;
- poll:   the same 202, then `GET /jobs/{id}` every `--poll-interval` seconds until it
  finishes, then the image from its URL.

Each column is wall time from sending the request to holding the image bytes; for the jobs,
the time to the 202 and the time fetching the image are also shown, so that what is left is
waiting for the job to run and be seen as done. A job's bytes must equal the synchronous
answer's for the same seed; the output says so when they do not.
"""

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from benchmarks.local_service import running_service

PROMPT = "a red fox in the snow"
ASYNC = {"Prefer": "respond-async"}
COLUMNS = ("sync", "events", "poll")
JOB_COLUMNS = ("events", "poll")

Phases = dict[str, float]  # a job's time to its 202 ("accepted") and image download ("fetch")
Measure = Callable[[httpx.Client, dict[str, Any], Phases], bytes]


def sync_image(client: httpx.Client, body: dict[str, Any], _phases: Phases) -> bytes:
    response = client.post("/generate", json=body)
    response.raise_for_status()
    return response.content


def _submit(client: httpx.Client, body: dict[str, Any], phases: Phases) -> str:
    started = time.perf_counter()
    response = client.post("/generate", json=body, headers=ASYNC)
    phases["accepted"] = time.perf_counter() - started
    if response.status_code != 202:
        raise RuntimeError(f"expected 202 for a job, got {response.status_code}: {response.text}")
    job_id: str = response.json()["id"]
    return job_id


def _image_of(client: httpx.Client, job: dict[str, Any], phases: Phases) -> bytes:
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job['id']} ended {job['status']}: {job.get('error')}")
    started = time.perf_counter()
    response = client.get(job["images"][0]["url"])
    response.raise_for_status()
    phases["fetch"] = time.perf_counter() - started
    return response.content


def job_image_by_events(client: httpx.Client, body: dict[str, Any], phases: Phases) -> bytes:
    job_id = _submit(client, body, phases)
    with client.stream("GET", f"/jobs/{job_id}/events") as stream:
        stream.raise_for_status()
        event = ""
        for line in stream.iter_lines():
            if line.startswith("event:"):
                event = line.removeprefix("event:").strip()
            elif line.startswith("data:") and event == "done":
                return _image_of(client, json.loads(line.removeprefix("data:")), phases)
    raise RuntimeError(f"the events of {job_id} ended without `done`")


def job_image_by_polling(interval: float) -> Measure:
    def measure(client: httpx.Client, body: dict[str, Any], phases: Phases) -> bytes:
        job_id = _submit(client, body, phases)
        while True:
            job: dict[str, Any] = client.get(f"/jobs/{job_id}").json()
            if job["status"] not in ("queued", "running"):
                return _image_of(client, job, phases)
            time.sleep(interval)

    return measure


def run(client: httpx.Client, args: argparse.Namespace) -> dict[str, Any]:
    body = {
        "prompt": PROMPT,
        "seed": args.seed,
        "image_size": args.size,
        "num_inference_steps": args.steps,
    }
    measures: dict[str, Measure] = {
        "sync": sync_image,
        "events": job_image_by_events,
        "poll": job_image_by_polling(args.poll_interval),
    }
    for measure in measures.values():  # warm-up: first requests pay for lazy set-up
        measure(client, body, {})
    seconds: dict[str, list[float]] = {name: [] for name in COLUMNS}
    phases: dict[str, dict[str, list[float]]] = {
        name: {"accepted": [], "fetch": []} for name in JOB_COLUMNS
    }
    images: dict[str, bytes] = {}
    for _ in range(args.rounds):
        for name in COLUMNS:
            these: Phases = {}
            started = time.perf_counter()
            images[name] = measures[name](client, body, these)
            seconds[name].append(time.perf_counter() - started)
            for phase, value in these.items():
                phases[name][phase].append(value)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    phase_medians = {
        name: {phase: statistics.median(values) for phase, values in by_phase.items()}
        for name, by_phase in phases.items()
    }
    same = {name: images[name] == images["sync"] for name in JOB_COLUMNS}
    return {
        "model": args.model,
        "devices": args.devices,
        "size": args.size,
        "steps": args.steps,
        "seed": args.seed,
        "rounds": args.rounds,
        "poll_interval_s": args.poll_interval,
        "seconds": seconds,
        "median_s": medians,
        "job_phase_median_s": phase_medians,
        "ratio_to_sync": {name: medians[name] / medians["sync"] for name in COLUMNS},
        "same_bytes_as_sync": same,
    }


def report(result: dict[str, Any]) -> str:
    medians, ratios = result["median_s"], result["ratio_to_sync"]
    phases = result["job_phase_median_s"]
    lines = [
        f"model={result['model']} devices={result['devices']} size={result['size']} "
        f"steps={result['steps']} seed={result['seed']} rounds={result['rounds']} "
        f"poll every {result['poll_interval_s']} s (median seconds per image, "
        "request to image bytes)",
        f"{'':>8} {'median':>9} {'vs sync':>8} {'to 202':>9} {'fetch':>9}",
        f"{'sync':>8} {medians['sync']:>9.4f} {ratios['sync']:>8.3f}",
        *(
            f"{name:>8} {medians[name]:>9.4f} {ratios[name]:>8.3f} "
            f"{phases[name]['accepted']:>9.4f} {phases[name]['fetch']:>9.4f}"
            for name in JOB_COLUMNS
        ),
    ]
    for name, same in result["same_bytes_as_sync"].items():
        if same:
            lines.append(f"{name}: the job's image is byte for byte the synchronous one")
        else:
            lines.append(f"{name}: THE JOB'S IMAGE DIFFERS from the synchronous one (same seed)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--devices", default="cpu", help="OVIS_DEVICES for the service")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--poll-interval", type=float, default=0.05)
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()

    with running_service({"OVIS_MODEL": args.model, "OVIS_DEVICES": args.devices}) as client:
        result = run(client, args)
    print(report(result))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
