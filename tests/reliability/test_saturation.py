"""Section 2, saturation: many concurrent clients against a queue of two, on the tiny real
pipeline. Every request must be answered 200, or 503 with Retry-After; none may hang or see its
connection reset; /health must stay quick while the worker is busy."""

import asyncio
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from tests.reliability.figures import FigureBook, latency_summary, percentile
from tests.support.service import ServiceProcess, run_service

QUEUE_SIZE = 2
CLIENTS = 48
REQUESTS_PER_CLIENT = 40  # bounded in count...
LOAD_SECONDS = 15.0  # ...and in time: no new request starts after this
REQUEST_TIMEOUT = 120.0  # a request that takes longer counts as hung
BODY = {"prompt": "a lighthouse at dusk", "num_inference_steps": 4, "image_size": 512}
# Half the clients speak OpenAI's Images API: the same queue, the same answers.
OPENAI_BODY = {"prompt": "a lighthouse at dusk", "num_inference_steps": 4, "size": "512x512"}


@dataclass
class Outcome:
    ok: list[float] = field(default_factory=list)  # seconds, per 200
    refused: list[float] = field(default_factory=list)  # seconds, per 503
    retry_after: list[int] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)  # other statuses, errors, hangs


@pytest.fixture(scope="module")
def busy_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    env = {"OVIS_QUEUE_SIZE": str(QUEUE_SIZE)}
    with run_service(tmp_path_factory.mktemp("saturation"), env=env) as service:
        yield service


def _served(response: httpx.Response, openai: bool) -> bool:
    if openai:
        return bool(response.json()["data"][0]["b64_json"])
    return response.content.startswith(b"\x89PNG")


def _refusal_reason(response: httpx.Response, openai: bool) -> str:
    body = response.json()
    return str(body["error"]["code"] if openai else body["detail"])


async def _client(
    http: httpx.AsyncClient, outcome: Outcome, stop_at: float, openai: bool = False
) -> None:
    path, body = ("/v1/images/generations", OPENAI_BODY) if openai else ("/generate", BODY)
    full = "queue_full" if openai else "the queue is full; retry later"
    for _ in range(REQUESTS_PER_CLIENT):
        if time.monotonic() > stop_at:
            return
        started = time.monotonic()
        try:
            response = await http.post(path, json=body)
        except httpx.HTTPError as exc:  # reset, refused, protocol error or timeout
            outcome.unexpected.append(f"{type(exc).__name__}: {exc}")
            continue
        seconds = time.monotonic() - started
        if response.status_code == 200 and _served(response, openai):
            outcome.ok.append(seconds)
        elif response.status_code == 503:
            outcome.refused.append(seconds)
            retry_after = response.headers.get("retry-after", "")
            if not retry_after.isdigit() or int(retry_after) < 1:
                outcome.unexpected.append(f"503 without a usable Retry-After: {retry_after!r}")
            else:
                outcome.retry_after.append(int(retry_after))
            if _refusal_reason(response, openai) != full:
                outcome.unexpected.append(f"503 for another reason: {response.text}")
            # A short, jittered pause, far below what Retry-After asks: impatient clients.
            await asyncio.sleep(random.uniform(0.05, 0.25))
        else:
            outcome.unexpected.append(f"{response.status_code}: {response.text[:200]}")


async def _load(base_url: str) -> Outcome:
    outcome = Outcome()
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=REQUEST_TIMEOUT) as http:
        stop_at = time.monotonic() + LOAD_SECONDS
        clients = [_client(http, outcome, stop_at, openai=i % 2 == 1) for i in range(CLIENTS)]
        # The whole run is bounded too: a hung request fails the test instead of stalling it.
        await asyncio.wait_for(asyncio.gather(*clients), LOAD_SECONDS + REQUEST_TIMEOUT)
    return outcome


def _probe_health(
    base_url: str, stop: threading.Event, samples: list[tuple[float, int, int]]
) -> None:
    """From another thread, as a load balancer would: latency, status, and whether a job ran."""
    with httpx.Client(base_url=base_url, timeout=30) as client:
        while not stop.is_set():
            started = time.monotonic()
            response = client.get("/health")
            samples.append(
                (time.monotonic() - started, response.status_code, response.json()["running"])
            )
            stop.wait(0.05)


def test_saturation_answers_every_request_with_200_or_503(
    busy_service: ServiceProcess, figures: FigureBook
) -> None:
    samples: list[tuple[float, int, int]] = []
    stop = threading.Event()
    prober = threading.Thread(target=_probe_health, args=(busy_service.base_url, stop, samples))
    prober.start()
    started = time.monotonic()
    try:
        outcome = asyncio.run(_load(busy_service.base_url))
    finally:
        stop.set()
        prober.join(timeout=60)
    wall = time.monotonic() - started

    assert not outcome.unexpected, outcome.unexpected[:5]
    assert len(outcome.ok) >= QUEUE_SIZE + 1, "the worker never got busy"
    assert len(outcome.refused) >= CLIENTS - QUEUE_SIZE - 1, "the queue never filled up"
    busy = [seconds for seconds, status, running in samples if running]
    assert len(busy) >= 20, "too few /health samples while a job was running"
    assert {status for _, status, _ in samples} == {200}
    # A refusal must not wait for a generation: it is answered from the event loop at once.
    assert percentile(outcome.refused, 99) < 5.0

    total = len(outcome.ok) + len(outcome.refused)
    figures.add(
        "2 saturation",
        "load",
        f"{CLIENTS} clients (half on /v1), queue {QUEUE_SIZE}, 512 px x 4 steps, "
        f"{total} requests in {wall:.1f} s",
    )
    figures.add(
        "2 saturation", "answers", f"{len(outcome.ok)} x 200, {len(outcome.refused)} x 503, 0 other"
    )
    figures.add("2 saturation", "hung / reset connections", len(outcome.unexpected))
    figures.add("2 saturation", "503 latency", latency_summary(outcome.refused))
    figures.add(
        "2 saturation", "200 latency (queue + generate + encode)", latency_summary(outcome.ok)
    )
    figures.add("2 saturation", "/health latency while busy", latency_summary(busy))
    figures.add(
        "2 saturation",
        "Retry-After given (s)",
        f"min {min(outcome.retry_after)}, max {max(outcome.retry_after)}",
    )
    errors = [line for line in busy_service.logs() if line.get("level") in {"error", "critical"}]
    assert not errors, errors[:3]
