"""What the job runner does at start, before any thread takes work: put back what a previous
run left running, and send the webhooks a stop interrupted. (Running jobs is tested through the
API in tests/api/test_jobs.py and across processes in tests/e2e.)"""

import asyncio
import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from standardwebhooks.webhooks import Webhook

from ovis_service.api.job_schemas import job_view
from ovis_service.config import Settings
from ovis_service.job_runner import JobRunner
from ovis_service.store.database import open_database
from ovis_service.store.job_store import JobStore
from ovis_service.store.records import JobStatus, NewJob, WebhookStatus
from ovis_service.webhooks import WebhookSender
from ovis_service.worker.pool import InferencePool
from tests.support.fakes import FakeEngine

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
PARAMS = {"prompt": "x", "num_inference_steps": 2, "cfg_scale": 5.0, "width": 256, "height": 256}


class _Receiver(http.server.ThreadingHTTPServer):
    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        self.server.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        return None


@pytest.fixture
def receiver() -> Iterator[_Receiver]:
    server = _Receiver()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JobStore]:
    store = JobStore(open_database(Settings(data_dir=str(tmp_path))), ttl=3600)
    yield store
    store.close()


def new_job(webhook: str | None = None) -> NewJob:
    return NewJob(
        owner="",
        api="native",
        request={"params": [{**PARAMS, "seed": 1}], "format": "png", "quality": None},
        base_url="http://127.0.0.1:4201",
        webhook=webhook,
    )


def runner_for(store: JobStore, sender: WebhookSender | None = None) -> JobRunner:
    pool = InferencePool(FakeEngine(), capacity=1)  # never started: it takes no work
    return JobRunner(
        store,
        pool,
        Settings(),
        render=lambda record: msgspec.json.encode(job_view(record, record.base_url)),
        webhooks=sender,
    )


def test_a_start_on_sqlite_puts_back_what_the_last_run_left_running(store: JobStore) -> None:
    left_running = store.create(new_job())
    store.claim_next("a-process-that-died")
    waiting = store.create(new_job())

    async def start_and_stop() -> None:
        runner = runner_for(store)
        await runner.start()
        await runner.stop(timeout=1)

    asyncio.run(start_and_stop())
    for job_id in (left_running.id, waiting.id):
        record = store.get_any(job_id)
        assert record is not None
        assert record.status is JobStatus.QUEUED
    # It keeps its place: it was older, so it runs first.
    claimed = store.claim_next("next")
    assert claimed is not None
    assert claimed.id == left_running.id


def test_a_start_sends_the_webhooks_a_stop_interrupted(
    store: JobStore, receiver: _Receiver
) -> None:
    port = receiver.server_address[1]
    job = store.create(new_job(webhook=f"http://127.0.0.1:{port}/hook"))
    store.claim_next("earlier run")
    store.finish_unsuccessfully(job.id, JobStatus.FAILED, "the GPU ran out of memory", "oom")
    record = store.get_any(job.id)
    assert record is not None
    assert record.webhook_status is WebhookStatus.PENDING

    async def start_and_wait() -> None:
        sender = WebhookSender(SECRET, [f"127.0.0.1:{port}"], delays=(0.05,))
        runner = runner_for(store, sender)
        await runner.start()
        deadline = time.monotonic() + 10
        while store.webhooks_pending():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await runner.stop(timeout=1)

    asyncio.run(start_and_wait())
    ((headers, body),) = receiver.received
    payload = Webhook(SECRET).verify(body, headers)
    assert (payload["id"], payload["status"]) == (job.id, "failed")
    assert payload["error"] == {"message": "the GPU ran out of memory", "code": "oom"}
    delivered = store.get_any(job.id)
    assert delivered is not None
    assert delivered.webhook_status is WebhookStatus.DELIVERED
