"""Section 3, soak: a long run of generations on the tiny real pipeline, watching the service
process's memory, threads and file descriptors.

CI runs a short soak; the long one is `uv run pytest tests/reliability -m soak -s`
(SOAK_GENERATIONS sets its length, 2,000 by default)."""

import math
import os
import statistics
import sys
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.reliability import heap_probe
from tests.reliability.figures import FigureBook
from tests.support.service import ServiceProcess, run_service

MIB = 2**20
WARMUP_GENERATIONS = 96
CHECKPOINTS = 10
CLIENTS = 2  # two at a time, so that the queue is used too
SIZES = (256, 320, 384)
PROMPTS = ("a fox", "a lighthouse at dusk, " * 8, "x" * 1500, "ramen 🍜 in a bowl")


@dataclass(frozen=True)
class Sample:
    generations: int
    rss: int
    threads: int
    fds: int
    heap_in_use: int
    heap_free_in_arenas: int
    objects: int


def _sample(service: ServiceProcess, probe: Path, generations: int, n: int) -> Sample:
    """Resident memory, threads and open file descriptors of the service from /proc (Linux),
    and malloc's and the garbage collector's view from inside it (tests/reliability/heap_probe)."""
    proc = Path(f"/proc/{service.process.pid}")
    status = dict(
        line.split(":", 1) for line in (proc / "status").read_text().splitlines() if ":" in line
    )
    inside = heap_probe.ask(probe, n)
    return Sample(
        generations=generations,
        rss=int(status["VmRSS"].split()[0]) * 1024,
        threads=len(list((proc / "task").iterdir())),
        fds=len(list((proc / "fd").iterdir())),
        heap_in_use=inside["heap_in_use"],
        heap_free_in_arenas=inside["heap_free_in_arenas"],
        objects=inside["objects"],
    )


CYCLE = 12  # the request mix repeats every 12 generations (3 sizes x 4 prompts)


def _body(i: int) -> dict[str, object]:
    """Varied valid requests, so that allocations of many shapes come and go."""
    return {
        "prompt": PROMPTS[i % len(PROMPTS)],
        "negative_prompt": "blur" if i % 3 else "",
        "num_inference_steps": 1 + i % 2,
        "image_size": SIZES[i % len(SIZES)],
        "cfg_scale": 5.0 if i % 2 else 1.0,
        "seed": i,
    }


class Soak:
    """Two clients, each on one keep-alive connection for the whole run, so that the service's
    file descriptors can be compared exactly between samples. Generation `i` always gets
    `_body(i)`, and samples are taken a whole number of cycles apart: the memory a process holds
    depends on the sizes of its last few jobs, and this way every sample follows the same ones."""

    def __init__(self, service: ServiceProcess) -> None:
        self.clients = [service.client(timeout=120) for _ in range(CLIENTS)]
        self.lock = threading.Lock()
        self.started = 0
        self.done = 0
        self.errors_sent = 0
        self.problems: list[str] = []

    def close(self) -> None:
        for client in self.clients:
            client.close()

    def _worker(self, client: httpx.Client, target: int, deadline: float) -> None:
        while time.monotonic() < deadline:
            with self.lock:
                if self.started >= target:
                    return
                i = self.started
                self.started += 1
            if i % 10 == 9:
                # Error paths leak too if anything does: a 422 and a 404 now and then.
                bad = client.post("/generate", json={"prompt": "a", "image_size": 100})
                missing = client.get("/nowhere")
                if (bad.status_code, missing.status_code) != (422, 404):
                    self.problems.append(f"{bad.status_code}/{missing.status_code}")
                with self.lock:
                    self.errors_sent += 1
            response = client.post("/generate", json=_body(i))
            if response.status_code != 200:
                self.problems.append(f"{response.status_code}: {response.text[:200]}")
            with self.lock:
                self.done += 1

    def run_until(self, target: int, time_limit: float) -> None:
        deadline = time.monotonic() + time_limit
        workers = [
            threading.Thread(target=self._worker, args=(client, target, deadline))
            for client in self.clients
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            # Each worker checks the deadline between requests; one request more may be under way.
            worker.join(timeout=time_limit + 120)
        assert not any(worker.is_alive() for worker in workers), "a soak client hung"
        assert not self.problems, self.problems[:5]
        assert self.done == target, f"only {self.done} of {target} generations in {time_limit} s"


# glibc raises its mmap threshold each time a large mmapped block is freed, so after a while the
# images and tensors of a generation come from the heap arenas instead; with two requests in
# flight (the inference thread allocating while another thread encodes a PNG) the arenas
# fragment, and RSS creeps up by about 10 KiB per generation while the heap in use and the
# Python objects stay flat. A fixed threshold keeps large buffers in mmap and RSS flat, at a cost
# in speed on the CPU pipeline. See docs/reliability.md, section 3.
MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "131072"}
GLIBC_TUNING = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_ARENA_MAX",
)
# What glibc's defaults may add to RSS: kept free memory, not a leak (that is checked apart).
FRAGMENTATION_PER_GENERATION = 16 * 1024


def _glibc_defaults() -> dict[str, str]:
    tuned = [name for name in GLIBC_TUNING if name in os.environ]
    if tuned:
        pytest.skip(f"glibc's defaults cannot be measured with {tuned} set")
    return {}


PROBE_COMMAND = [sys.executable, "-m", "tests.reliability.heap_probe"]


def _service(tmp_path: Path, malloc_env: dict[str, str]) -> AbstractContextManager[ServiceProcess]:
    (tmp_path / "probe").mkdir()
    env = {"OVIS_QUEUE_SIZE": "2", "HEAP_PROBE_DIR": str(tmp_path / "probe"), **malloc_env}
    return run_service(tmp_path, env=env, command=PROBE_COMMAND)


def _soak(
    service: ServiceProcess,
    figures: FigureBook,
    *,
    section: str,
    generations: int,
    time_limit: float,
    max_rss_growth: int,
) -> None:
    probe = service.log_path.parent / "probe"
    soak = Soak(service)
    try:
        soak.run_until(WARMUP_GENERATIONS, time_limit)
        samples = [_sample(service, probe, soak.done, 0)]
        started = time.monotonic()
        # Ten checkpoints, a whole number of cycles apart, reaching at least `generations`.
        step = math.ceil((generations - WARMUP_GENERATIONS) / CHECKPOINTS / CYCLE) * CYCLE
        for k in range(1, CHECKPOINTS + 1):
            remaining = time_limit - (time.monotonic() - started)
            soak.run_until(WARMUP_GENERATIONS + k * step, remaining)
            samples.append(_sample(service, probe, soak.done, k))
    finally:
        soak.close()
    seconds = time.monotonic() - started
    first, last = samples[0], samples[-1]
    # Robust to one odd sample: the median of the last three against that of the first three.
    growth = int(
        statistics.median(s.rss for s in samples[-3:])
        - statistics.median(s.rss for s in samples[:3])
    )
    slope = statistics.linear_regression(
        [s.generations for s in samples], [s.rss for s in samples]
    ).slope
    peak = max(s.rss for s in samples)
    figures.add(section, "generations", f"{soak.done} (+{soak.errors_sent} error requests)")
    figures.add(section, "rate", f"{(soak.done - first.generations) / seconds:.1f} images/s")
    figures.add(
        section,
        "RSS after warm-up / at end / peak",
        f"{first.rss / MIB:.1f} / {last.rss / MIB:.1f} / {peak / MIB:.1f} MiB",
    )
    figures.add(
        section,
        "RSS growth after warm-up (median of last 3 - first 3 checkpoints)",
        f"{growth / MIB:+.1f} MiB (bound {max_rss_growth / MIB:.0f}); "
        f"trend {slope / 1024:+.2f} KiB per generation",
    )
    figures.add(
        section, "RSS at checkpoints (MiB)", " ".join(f"{s.rss / MIB:.0f}" for s in samples)
    )
    heap_growth = last.heap_in_use - first.heap_in_use
    figures.add(
        section,
        "malloc heap in use after warm-up / at end",
        f"{first.heap_in_use / MIB:.2f} / {last.heap_in_use / MIB:.2f} MiB "
        f"({heap_growth / 1024:+.0f} KiB); freed but kept in arenas "
        f"{first.heap_free_in_arenas / MIB:.1f} / {last.heap_free_in_arenas / MIB:.1f} MiB",
    )
    figures.add(section, "Python objects before / after", f"{first.objects} / {last.objects}")
    figures.add(section, "threads before / after", f"{first.threads} / {last.threads}")
    figures.add(section, "open fds before / after", f"{first.fds} / {last.fds}")
    # The leak checks proper: what the service holds, whatever malloc keeps around it.
    assert heap_growth <= 2 * MIB, samples
    assert last.objects - first.objects <= 2_000, samples
    assert growth <= max_rss_growth, samples
    # asyncio's default executor (PNG encoding) may start one more thread the first time two
    # encodings overlap; a leak would add threads in proportion to the requests.
    assert last.threads <= first.threads + 1, samples
    assert last.fds == first.fds, samples


@pytest.mark.timeout(480)  # the time limit below, plus the service's start
def test_a_short_soak_leaks_no_memory_threads_or_fds(tmp_path: Path, figures: FigureBook) -> None:
    # 200 generations after the 96 of the warm-up: about 50 s on an idle 2-core machine at the
    # rate of the earlier 400-generation run (85 s), and 150 s measured with other test runs
    # sharing the cores. A leak of 10 objects or 10 KiB per request still crosses the bounds
    # below; the long soak is the thorough one.
    generations = 200
    with _service(tmp_path, _glibc_defaults()) as service:
        _soak(
            service,
            figures,
            section="3 soak (CI, short, glibc malloc defaults)",
            generations=generations,
            time_limit=400.0,
            max_rss_growth=8 * MIB + FRAGMENTATION_PER_GENERATION * generations,
        )


@pytest.mark.soak
@pytest.mark.timeout(2 * 3600)  # its time limit of an hour, the warm-up and setup
@pytest.mark.parametrize("malloc", ["glibc defaults", "MALLOC_MMAP_THRESHOLD_=131072"])
def test_a_long_soak_leaks_no_memory_threads_or_fds(
    tmp_path: Path, figures: FigureBook, malloc: str
) -> None:
    generations = int(os.environ.get("SOAK_GENERATIONS", "2000"))
    assert generations >= 1000
    if malloc == "glibc defaults":
        malloc_env = _glibc_defaults()
        bound = 8 * MIB + FRAGMENTATION_PER_GENERATION * generations
    else:
        malloc_env = MMAP_THRESHOLD
        bound = 8 * MIB
    with _service(tmp_path, malloc_env) as service:
        _soak(
            service,
            figures,
            section=f"3 soak (long, {malloc})",
            generations=generations,
            time_limit=3600.0,
            max_rss_growth=bound,
        )
