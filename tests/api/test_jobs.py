"""Async jobs through the API: `Prefer: respond-async`, `/jobs`, `/images/{token}`, webhooks.

Most tests drive the app in this process around fake engines whose `gate` holds a job running
for as long as a test needs; the last ones go through real HTTP to the tiny model with the
official `openai` client.
"""

import http.server
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from litestar import Litestar
from litestar.testing import TestClient
from sqlalchemy.exc import OperationalError
from standardwebhooks.webhooks import Webhook

from ovis_service.app import create_app
from ovis_service.config import Settings
from ovis_service.store.database import open_database
from ovis_service.store.job_store import JobStore
from ovis_service.store.records import JobRecord, NewImage, NewJob
from tests.support.fakes import FakeEngine
from tests.support.in_process import ready_client
from tests.support.service import ServiceProcess
from tests.support.sse import read_events

KEY_A, KEY_B = "key-a", "key-b"
AS_A = {"Authorization": f"Bearer {KEY_A}"}
AS_B = {"Authorization": f"Bearer {KEY_B}"}
ASYNC = {"Prefer": "respond-async"}
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
WAIT = 15.0
BODY = {"prompt": "a lighthouse", "num_inference_steps": 3, "image_size": 256}


def make_app(engine: FakeEngine, **settings: Any) -> Litestar:
    return create_app(Settings(api_keys=(KEY_A, KEY_B), warmup=False, **settings), engine=engine)


def submit(client: TestClient[Litestar], body: dict[str, Any] | None = None, **headers: str) -> str:
    answer = client.post("/generate", json=body or BODY, headers={**AS_A, **ASYNC, **headers})
    assert answer.status_code == 202, answer.text
    job_id: str = answer.json()["id"]
    return job_id


def job(client: TestClient[Litestar], job_id: str, headers: dict[str, str] = AS_A) -> Any:
    return client.get(f"/jobs/{job_id}", headers=headers).json()


def wait_for(client: TestClient[Litestar], job_id: str, *statuses: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT
    while True:
        body: dict[str, Any] = job(client, job_id)
        if body["status"] in statuses:
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.02)


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    gate = threading.Event()
    yield gate
    gate.set()  # never leave a job waiting on a closed gate


def test_respond_async_answers_202_with_the_job_and_where_to_follow_it() -> None:
    with ready_client(make_app(FakeEngine())) as client:
        answer = client.post(
            "/generate", json=BODY, headers={**AS_A, "Prefer": "wait=10, respond-async"}
        )
        assert answer.status_code == 202
        accepted = answer.json()
        assert answer.headers["location"] == f"/jobs/{accepted['id']}"
        assert answer.headers["preference-applied"] == "respond-async"
        assert accepted["status"] in ("queued", "running")
        assert accepted["parameters"]["prompt"] == "a lighthouse"
        (seed,) = accepted["parameters"]["seeds"]  # drawn by the server, told at once
        done = wait_for(client, accepted["id"], "succeeded")
        assert done["progress"] is None
        (image,) = done["images"]
        assert image["seed"] == seed
        assert image["format"] == "png"
        assert image["url"].startswith("http://testserver.local/images/")
        picture = client.get(image["url"].removeprefix("http://testserver.local"))
        assert picture.status_code == 200  # no key: the URL is the credential
        assert picture.headers["content-type"] == "image/png"
        assert picture.headers["x-seed"] == str(seed)


def test_without_the_header_both_endpoints_answer_as_before() -> None:
    with ready_client(make_app(FakeEngine())) as client:
        assert client.post("/generate", json=BODY, headers=AS_A).headers["content-type"] == (
            "image/png"
        )
        answer = client.post("/v1/images/generations", json={"prompt": "x"}, headers=AS_A)
        assert answer.status_code == 200
        assert "b64_json" in answer.json()["data"][0]


def test_the_openai_endpoint_makes_jobs_too_in_its_own_format() -> None:
    with ready_client(make_app(FakeEngine())) as client:
        answer = client.post(
            "/v1/images/generations",
            json={"prompt": "x", "n": 2, "seed": 7, "output_format": "webp"},
            headers={**AS_A, **ASYNC},
        )
        assert answer.status_code == 202
        accepted = answer.json()
        assert accepted["api"] == "openai"
        assert accepted["parameters"]["seeds"] == [7, 8]
        done = wait_for(client, accepted["id"], "succeeded")
        assert [(image["seed"], image["format"]) for image in done["images"]] == [
            (7, "webp"),
            (8, "webp"),
        ]
        path = done["images"][1]["url"].removeprefix("http://testserver.local")
        assert client.get(path).headers["content-type"] == "image/webp"
        # A stream carries images itself; as a job it is refused naming the field.
        streamed = client.post(
            "/v1/images/generations",
            json={"prompt": "x", "stream": True},
            headers={**AS_A, **ASYNC},
        )
        assert streamed.status_code == 400
        assert streamed.json()["error"]["param"] == "stream"


def test_jobs_belong_to_the_key_that_made_them() -> None:
    with ready_client(make_app(FakeEngine())) as client:
        mine = submit(client)
        wait_for(client, mine, "succeeded")
        for method, path in [
            ("GET", f"/jobs/{mine}"),
            ("GET", f"/jobs/{mine}/events"),
            ("POST", f"/jobs/{mine}/cancel"),
            ("DELETE", f"/jobs/{mine}"),
        ]:
            answer = client.request(method, path, headers=AS_B)
            assert answer.status_code == 404, (method, path)
            assert "no such job" in answer.json()["detail"]
        assert client.get("/jobs", headers=AS_B).json()["data"] == []
        assert [j["id"] for j in client.get("/jobs", headers=AS_A).json()["data"]] == [mine]
        assert client.get(f"/jobs/{mine}").status_code == 401  # and the key is needed at all


def test_the_list_is_newest_first_and_pages_through_every_job_once() -> None:
    with ready_client(make_app(FakeEngine())) as client:
        made = [submit(client) for _ in range(5)]
        seen: list[str] = []
        page = client.get("/jobs?limit=2", headers=AS_A).json()
        while True:
            seen += [item["id"] for item in page["data"]]
            if not page["has_more"]:
                assert page["next_cursor"] is None
                break
            page = client.get(f"/jobs?limit=2&after={page['next_cursor']}", headers=AS_A).json()
        assert seen == made[::-1]
        refused = client.get("/jobs?after=not-a-cursor", headers=AS_A)
        assert refused.status_code == 422
        assert "after" in refused.json()["detail"]
        too_few = client.get("/jobs?limit=0", headers=AS_A)
        assert (too_few.status_code, too_few.json()["detail"]) == (422, "limit: Expected int >= 1")


def test_a_queued_job_is_cancelled_at_once_and_a_running_one_at_its_next_step(
    gate: threading.Event,
) -> None:
    engine = FakeEngine(gate=gate, step_seconds=0.01)
    with ready_client(make_app(engine)) as client:
        running = submit(client, {**BODY, "prompt": "first", "num_inference_steps": 50})
        wait_for(client, running, "running")
        queued = submit(client, {**BODY, "prompt": "second"})
        cancelled = client.post(f"/jobs/{queued}/cancel", headers=AS_A).json()
        assert cancelled["status"] == "cancelled"
        assert cancelled["error"]["code"] == "cancelled"
        asked = client.post(f"/jobs/{running}/cancel", headers=AS_A).json()
        assert asked["status"] == "running"  # it stops at its next step
        gate.set()
        stopped = wait_for(client, running, "cancelled", "succeeded")
        assert stopped["status"] == "cancelled"
        assert stopped["images"] == []
        assert engine.steps_run < 50
        assert "second" not in engine.started
        # Cancelling a finished job leaves it as it is.
        again = client.post(f"/jobs/{running}/cancel", headers=AS_A)
        assert (again.status_code, again.json()["status"]) == (200, "cancelled")


def test_delete_forgets_the_job_and_its_images() -> None:
    with ready_client(make_app(FakeEngine())) as client:
        job_id = submit(client)
        url = wait_for(client, job_id, "succeeded")["images"][0]["url"]
        path = url.removeprefix("http://testserver.local")
        assert client.get(path).status_code == 200
        assert client.delete(f"/jobs/{job_id}", headers=AS_A).status_code == 204
        assert client.get(f"/jobs/{job_id}", headers=AS_A).status_code == 404
        assert client.get(path).status_code == 404
        assert client.delete(f"/jobs/{job_id}", headers=AS_A).status_code == 404


def test_deleting_a_running_job_stops_it_and_frees_its_thread(gate: threading.Event) -> None:
    engine = FakeEngine(gate=gate, step_seconds=0.01)
    with ready_client(make_app(engine)) as client:
        job_id = submit(client, {**BODY, "num_inference_steps": 100})
        wait_for(client, job_id, "running")
        assert client.delete(f"/jobs/{job_id}", headers=AS_A).status_code == 204
        gate.set()
        # The next job runs: the deleted one stopped rather than holding the only thread.
        after = submit(client, {**BODY, "prompt": "next"})
        wait_for(client, after, "succeeded")
        assert engine.steps_run < 100 + 3


def test_events_stream_progress_then_the_finished_job() -> None:
    with ready_client(make_app(FakeEngine(step_seconds=0.02))) as client:
        job_id = submit(client, {**BODY, "num_inference_steps": 10})
        with client.stream("GET", f"/jobs/{job_id}/events", headers=AS_A) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = read_events(stream)
        names = [name for name, _ in events]
        assert names[-1] == "done"
        assert set(names[:-1]) == {"progress"}
        steps = [data["step"] for name, data in events if name == "progress"]
        assert steps == sorted(steps)
        assert steps[-1] == 10
        assert len(steps) >= 5  # each step as it happens, not a poll now and then
        assert events[-1][1]["status"] == "succeeded"
        # A finished job's stream sends its final state at once.
        with client.stream("GET", f"/jobs/{job_id}/events", headers=AS_A) as stream:
            assert [name for name, _ in read_events(stream)] == ["done"]


def test_a_failed_job_says_why() -> None:
    with ready_client(make_app(FakeEngine())) as client:
        job_id = submit(client, {**BODY, "prompt": "fail please"})
        failed = wait_for(client, job_id, "failed")
        assert failed["error"] == {
            "message": "internal error while generating the image",
            "code": "failed",
        }
        assert "SECRET" not in str(failed)


def test_synchronous_requests_go_ahead_of_the_backlog(gate: threading.Event) -> None:
    engine = FakeEngine(gate=gate)
    with ready_client(make_app(engine)) as client:
        submit(client, {**BODY, "prompt": "async 1"})
        deadline = time.monotonic() + WAIT
        while not engine.running.is_set():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        backlog = [submit(client, {**BODY, "prompt": f"async {i}"}) for i in (2, 3)]
        answers: list[int] = []
        waiting = threading.Thread(
            target=lambda: answers.append(
                client.post("/generate", json={**BODY, "prompt": "sync"}, headers=AS_A).status_code
            )
        )
        waiting.start()
        deadline = time.monotonic() + WAIT
        while client.get("/health").json()["queue_depth"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        gate.set()
        waiting.join(WAIT)
        for job_id in backlog:
            wait_for(client, job_id, "succeeded")
        assert answers == [200]
        assert engine.started == ["async 1", "sync", "async 2", "async 3"]


def test_a_full_backlog_is_a_503_with_retry_after(gate: threading.Event) -> None:
    with ready_client(make_app(FakeEngine(gate=gate), max_pending_jobs=2)) as client:
        first = submit(client)
        wait_for(client, first, "running")
        submit(client)
        submit(client)
        refused = client.post("/generate", json=BODY, headers={**AS_A, **ASYNC})
        assert refused.status_code == 503
        assert int(refused.headers["retry-after"]) >= 1
        assert "backlog is full" in refused.json()["detail"]
        metrics = client.get("/metrics", headers=AS_A).text
        assert "ovis_pending_jobs 2.0" in metrics


def test_finished_jobs_and_their_images_expire_after_the_ttl() -> None:
    with ready_client(make_app(FakeEngine(), job_ttl=1)) as client:
        job_id = submit(client)
        done = wait_for(client, job_id, "succeeded")
        path = done["images"][0]["url"].removeprefix("http://testserver.local")
        assert done["expires_at"] - done["finished_at"] in (0, 1, 2)
        time.sleep(1.6)
        assert client.get(f"/jobs/{job_id}", headers=AS_A).status_code == 404
        assert client.get(path).status_code == 404
        assert client.get("/jobs", headers=AS_A).json()["data"] == []


class _FullDisk(JobStore):
    """A store whose disk fills up: every write of images, or of new jobs once `full`, fails as
    SQLite fails then."""

    full = False

    def succeed(self, job_id: str, files: Sequence[NewImage], replica: str | None = None) -> bool:
        raise OperationalError("INSERT INTO ovis_images", {}, Exception("database or disk is full"))

    def create(self, new: NewJob) -> JobRecord:
        if self.full:
            raise OperationalError("INSERT INTO ovis_jobs", {}, Exception("disk is full"))
        return super().create(new)


def test_a_full_disk_fails_the_job_with_a_message_and_refuses_new_ones_with_a_503(
    tmp_path: Path,
) -> None:
    settings = Settings(api_keys=(KEY_A,), warmup=False, data_dir=str(tmp_path))
    store = _FullDisk(open_database(settings), ttl=60)
    with ready_client(create_app(settings, engine=FakeEngine(), store=store)) as client:
        failed = wait_for(client, submit(client), "failed")
        assert failed["error"]["code"] == "storage_error"
        assert "could not be stored" in failed["error"]["message"]
        store.full = True
        refused = client.post("/generate", json=BODY, headers={**AS_A, **ASYNC})
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "5"
        assert "job store" in refused.json()["detail"]
        # The service goes on: synchronous requests need no store.
        assert client.post("/generate", json=BODY, headers=AS_A).status_code == 200


class _CancelledAfterTheLastStep(JobStore):
    """A store in which every job's owner asks it to stop just as its images are stored."""

    def succeed(self, job_id: str, files: Sequence[NewImage], replica: str | None = None) -> bool:
        record = self.get_any(job_id)
        assert record is not None
        self.cancel(job_id, record.owner)
        return super().succeed(job_id, files, replica)


def test_a_cancel_that_arrives_after_the_last_step_ends_the_job_cancelled(
    tmp_path: Path,
) -> None:
    settings = Settings(api_keys=(KEY_A,), warmup=False, data_dir=str(tmp_path))
    store = _CancelledAfterTheLastStep(open_database(settings), ttl=60)
    with ready_client(create_app(settings, engine=FakeEngine(), store=store)) as client:
        ended = wait_for(client, submit(client), "cancelled", "succeeded")
        assert ended["status"] == "cancelled"  # not left `running` for ever
        assert ended["images"] == []


def test_image_urls_use_the_public_url_when_set() -> None:
    app = make_app(FakeEngine(), public_url="https://images.example.com/ovis/")
    with ready_client(app) as client:
        job_id = submit(client)
        (image,) = wait_for(client, job_id, "succeeded")["images"]
        assert image["url"].startswith("https://images.example.com/ovis/images/")
        # The path behind it is this service's own.
        assert client.get(image["url"].removeprefix("https://images.example.com/ovis")).is_success


def test_an_unknown_image_token_or_a_wrong_extension_is_a_404() -> None:
    with ready_client(make_app(FakeEngine())) as client:
        assert client.get("/images/nothing-here.png").status_code == 404
        job_id = submit(client)
        url = wait_for(client, job_id, "succeeded")["images"][0]["url"]
        path = url.removeprefix("http://testserver.local")
        assert client.get(path.replace(".png", ".jpeg")).status_code == 404


class _Receiver(http.server.ThreadingHTTPServer):
    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses  # answered in turn; the last one repeats
        self.received: list[tuple[dict[str, str], bytes]] = []
        super().__init__(("127.0.0.1", 0), _ReceiverHandler)


class _ReceiverHandler(http.server.BaseHTTPRequestHandler):
    server: _Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        self.server.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
        status = self.server.statuses[min(len(self.server.received), len(self.server.statuses)) - 1]
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        return None


@pytest.fixture
def receiver() -> Iterator[_Receiver]:
    server = _Receiver([200])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_webhook_gets_the_finished_job_signed_as_standard_webhooks_says(
    receiver: _Receiver,
) -> None:
    port = receiver.server_address[1]
    receiver.statuses = [503, 200]  # a failed delivery is retried
    app = make_app(
        FakeEngine(),
        webhook_secret=SECRET,
        webhook_allowed_hosts=(f"127.0.0.1:{port}",),
    )
    hook = f"http://127.0.0.1:{port}/hooks/ovis"
    with ready_client(app) as client:
        job_id = submit(client, {**BODY, "webhook": hook})
        assert job(client, job_id)["webhook"] == hook
        deadline = time.monotonic() + WAIT
        while len(receiver.received) < 2:
            assert time.monotonic() < deadline, receiver.received
            time.sleep(0.05)
    (first_headers, _), (headers, body) = receiver.received
    assert first_headers["webhook-id"] == headers["webhook-id"] == job_id
    payload = Webhook(SECRET).verify(body, headers)
    assert payload["id"] == job_id
    assert payload["status"] == "succeeded"
    assert payload["images"][0]["url"].startswith("http://testserver.local/images/")
    with pytest.raises(Exception, match="signature"):
        Webhook("whsec_" + "A" * 32).verify(body, headers)


def test_a_job_cancelled_while_queued_still_sends_its_webhook(
    receiver: _Receiver, gate: threading.Event
) -> None:
    port = receiver.server_address[1]
    app = make_app(
        FakeEngine(gate=gate),
        webhook_secret=SECRET,
        webhook_allowed_hosts=(f"127.0.0.1:{port}",),
    )
    with ready_client(app) as client:
        wait_for(client, submit(client), "running")
        queued = submit(client, {**BODY, "webhook": f"http://127.0.0.1:{port}/h"})
        assert client.post(f"/jobs/{queued}/cancel", headers=AS_A).json()["status"] == "cancelled"
        deadline = time.monotonic() + WAIT
        while not receiver.received:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    ((headers, body),) = receiver.received
    assert Webhook(SECRET).verify(body, headers)["status"] == "cancelled"


def test_a_job_larger_than_the_pool_can_ever_take_is_refused_naming_n() -> None:
    engine = FakeEngine()
    with ready_client(make_app(engine, queue_size=1, max_images_per_request=4)) as client:
        answer = client.post(
            "/v1/images/generations", json={"prompt": "x", "n": 3}, headers={**AS_A, **ASYNC}
        )
        assert answer.status_code == 400
        assert answer.json()["error"]["param"] == "n"
        assert "at most 2 images" in answer.json()["error"]["message"]


def test_webhooks_to_addresses_off_the_allow_list_are_refused_naming_the_field(
    receiver: _Receiver,
) -> None:
    port = receiver.server_address[1]
    app = make_app(FakeEngine(), webhook_secret=SECRET, webhook_allowed_hosts=("127.0.0.2",))
    hook = f"http://127.0.0.1:{port}/hooks"  # loopback, and not on the list
    with ready_client(app) as client:
        native = client.post("/generate", json={**BODY, "webhook": hook}, headers={**AS_A, **ASYNC})
        assert native.status_code == 422
        assert native.json()["detail"].startswith("webhook: ")
        assert "OVIS_WEBHOOK_ALLOWED_HOSTS" in native.json()["detail"]
        v1 = client.post(
            "/v1/images/generations",
            json={"prompt": "x", "webhook": hook},
            headers={**AS_A, **ASYNC},
        )
        assert v1.status_code == 400
        assert v1.json()["error"]["param"] == "webhook"
        for scheme in ("ftp://127.0.0.2/x", "file:///etc/passwd"):
            answer = client.post(
                "/generate", json={**BODY, "webhook": scheme}, headers={**AS_A, **ASYNC}
            )
            assert answer.status_code == 422, scheme
        # Without the header there is no job to report on.
        plain = client.post("/generate", json={**BODY, "webhook": hook}, headers=AS_A)
        assert plain.status_code == 422
        assert "respond-async" in plain.json()["detail"]
        assert client.get("/jobs", headers=AS_A).json()["data"] == []
    assert receiver.received == []


def test_webhooks_need_a_signing_secret_on_the_server() -> None:
    with ready_client(make_app(FakeEngine())) as client:
        answer = client.post(
            "/generate",
            json={**BODY, "webhook": "http://127.0.0.1:9/x"},
            headers={**AS_A, **ASYNC},
        )
        assert answer.status_code == 422
        assert "OVIS_WEBHOOK_SECRET" in answer.json()["detail"]


# -- through real HTTP, the tiny model and the official client --------------------------------


@pytest.fixture(scope="module")
def sdk(tiny_service: ServiceProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=tiny_service.base_url + "/v1", api_key="unused") as client:
        yield client


def test_response_format_url_gives_urls_anyone_can_fetch(
    sdk: openai.OpenAI, tiny_service: ServiceProcess
) -> None:
    answer = sdk.images.generate(
        prompt="a red door",
        response_format="url",
        size="256x256",
        extra_body={"num_inference_steps": 2, "seed": 11},
    )
    assert answer.data is not None
    (item,) = answer.data
    assert item.b64_json is None
    assert item.url is not None
    assert item.url.startswith(tiny_service.base_url + "/images/")
    with tiny_service.client() as http:
        by_url = httpx.get(item.url, timeout=30)  # a plain GET, no key
        assert by_url.status_code == 200
        same = http.post(
            "/generate",
            json={"prompt": "a red door", "num_inference_steps": 2, "image_size": 256, "seed": 11},
        )
    # The same bytes and metadata a synchronous request returns.
    assert by_url.content == same.content


def test_the_sdk_sends_prefer_and_reads_the_job(
    sdk: openai.OpenAI, tiny_service: ServiceProcess
) -> None:
    raw = sdk.images.with_raw_response.generate(
        prompt="a blue boat",
        size="256x256",
        extra_headers={"Prefer": "respond-async"},
        extra_body={"num_inference_steps": 2},
    )
    assert raw.status_code == 202
    location = raw.headers["location"]
    with tiny_service.client() as http:
        deadline = time.monotonic() + 60
        while (body := http.get(location).json())["status"] != "succeeded":
            assert body["status"] in ("queued", "running"), body
            assert time.monotonic() < deadline
            time.sleep(0.1)
        (image,) = body["images"]
        assert http.get(image["url"]).headers["content-type"] == "image/png"
