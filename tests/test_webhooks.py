"""Webhook URLs and their delivery.

The address rules resolve names only through fake resolvers and never connect. Deliveries go to
a real HTTP server on 127.0.0.1, or to an in-memory transport where the test needs a public
address; nothing here sends a packet beyond loopback.
"""

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from standardwebhooks.webhooks import Webhook
from structlog.testing import capture_logs

from ovis_service.errors import BadRequestError
from ovis_service.webhooks import Resolver, WebhookSender, check_webhook_url, resolve_addresses

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
PUBLIC = "93.184.215.14"
PAYLOAD = json.dumps({"id": "job_1", "status": "succeeded"}).encode()
FAST = (0.05, 0.05)


def resolver(*addresses: str) -> Resolver:
    """A resolver that answers every name with `addresses`."""

    def resolve(host: str, port: int) -> list[str]:
        return list(addresses)

    return resolve


def refusal(url: str, allowed: tuple[str, ...] = (), *answers: str) -> str:
    with pytest.raises(BadRequestError) as error:
        check_webhook_url(url, allowed, resolve=resolver(*answers))
    assert error.value.param == "webhook"
    assert error.value.detail.startswith("webhook: ")
    return error.value.detail


# ---- which URLs may receive webhooks ----


def test_a_name_resolving_to_public_addresses_is_accepted() -> None:
    check_webhook_url(
        "https://hooks.example/ovis?k=1", (), resolve=resolver(PUBLIC, "2606:4700::1111")
    )


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("10.0.0.5", "a private address"),
        ("172.16.0.1", "a private address"),
        ("172.31.255.254", "a private address"),
        ("192.168.1.1", "a private address"),
        ("fd12:3456::1", "a private address"),
        ("169.254.10.1", "a link-local address"),
        ("fe80::1", "a link-local address"),
        ("169.254.169.254", "a cloud metadata address"),
        ("fd00:ec2::254", "a cloud metadata address"),
        ("100.100.100.200", "a cloud metadata address"),
        ("100.64.0.1", "a carrier-grade NAT address"),
        ("127.0.0.1", "a loopback address"),
        ("127.8.9.10", "a loopback address"),
        ("::1", "a loopback address"),
        ("::ffff:127.0.0.1", "an IPv6 form of 127.0.0.1, a loopback address"),
        ("::ffff:10.1.2.3", "an IPv6 form of 10.1.2.3, a private address"),
        ("64:ff9b::a00:5", "an IPv6 form of 10.0.0.5, a private address"),
        ("2002:a00:1::1", "a tunnel to 10.0.0.1, a private address"),
        ("0.0.0.0", "an unspecified address"),
        ("::", "an unspecified address"),
        ("224.0.0.1", "a multicast address"),
        ("ff02::1", "a multicast address"),
        ("192.0.2.7", "a documentation address"),
        ("2001:db8::7", "a documentation address"),
        ("240.0.0.1", "a reserved address"),
    ],
)
def test_every_non_public_range_is_refused(address: str, kind: str) -> None:
    detail = refusal("https://hooks.example/x", (), address)
    assert detail == (
        f"webhook: hooks.example resolves to {address}, {kind}; webhooks may only go to "
        "public addresses unless the host is listed in OVIS_WEBHOOK_ALLOWED_HOSTS"
    )


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://10.0.0.5/hook", "10.0.0.5 is a private address"),
        ("http://[::1]:8080/hook", "::1 is a loopback address"),
        ("http://[::ffff:127.0.0.1]/hook", "::ffff:127.0.0.1 is an IPv6 form of 127.0.0.1"),
        ("http://169.254.169.254/latest/meta-data", "169.254.169.254 is a cloud metadata"),
    ],
)
def test_ip_literals_are_judged_without_resolving(url: str, shown: str) -> None:
    def must_not_resolve(host: str, port: int) -> list[str]:
        raise AssertionError(f"{host} was resolved")

    with pytest.raises(BadRequestError, match=shown):
        check_webhook_url(url, (), resolve=must_not_resolve)


def test_a_public_ip_literal_is_accepted() -> None:
    check_webhook_url(f"http://{PUBLIC}:8080/hook", (), resolve=resolver())


def test_the_metadata_name_is_refused_whatever_it_resolves_to() -> None:
    detail = refusal("http://metadata.google.internal/computeMetadata/v1/", (), PUBLIC)
    assert "metadata.google.internal is a cloud metadata service" in detail
    # Spelled any way, with the root's trailing dot too.
    refusal("http://METADATA.Google.Internal./computeMetadata/v1/", (), PUBLIC)


def test_one_private_address_among_public_ones_is_refused() -> None:
    detail = refusal("https://hooks.example/", (), PUBLIC, "2606:4700::1111", "10.9.8.7")
    assert "hooks.example resolves to 10.9.8.7, a private address" in detail


def test_a_name_that_does_not_resolve_is_refused() -> None:
    def nxdomain(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(BadRequestError) as error:
        check_webhook_url("https://nowhere.example/", (), resolve=nxdomain)
    assert error.value.detail == "webhook: nowhere.example does not resolve"
    assert refusal("https://empty.example/") == "webhook: empty.example does not resolve"


@pytest.mark.parametrize(
    ("url", "rule"),
    [
        ("ftp://hooks.example/x", "must start with http:// or https://"),
        ("file:///etc/passwd", "must start with http:// or https://"),
        ("javascript:alert(1)", "must start with http:// or https://"),
        ("hooks.example/x", "must start with http:// or https://"),
        ("https://user:secret@hooks.example/x", "may not carry a user name or password"),
        ("https://token@hooks.example/x", "may not carry a user name or password"),
        ("http:///x", "has no host"),
        ("https://hooks.example:99999/x", "99999 is not a valid port"),
        ("https://hooks.example/" + "a" * 2048, "longer than 2048 characters"),
    ],
)
def test_malformed_urls_are_refused_before_any_lookup(url: str, rule: str) -> None:
    def must_not_resolve(host: str, port: int) -> list[str]:
        raise AssertionError(f"{host} was resolved")

    with pytest.raises(BadRequestError, match=rule) as error:
        check_webhook_url(url, (), resolve=must_not_resolve)
    assert error.value.param == "webhook"


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://receiver:9000/hook", ("receiver",)),
        ("http://Receiver:9000/hook", ("receiver:9000",)),
        ("http://10.0.0.5/hook", ("10.0.0.5",)),
        ("http://10.0.0.5/hook", ("10.0.0.5:80",)),
        ("https://10.0.0.5/hook", ("10.0.0.5:443",)),
        ("http://[::1]:8080/hook", ("[::1]:8080",)),
        ("http://[::1]:8080/hook", ("::1",)),
        ("http://[::1]:8080/hook", ("[::1]",)),
        ("http://metadata.google.internal/", ("metadata.google.internal",)),
    ],
)
def test_listed_hosts_may_be_private(url: str, allowed: tuple[str, ...]) -> None:
    check_webhook_url(url, allowed, resolve=resolver("10.0.0.5"))


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://receiver:9001/hook", ("receiver:9000",)),
        ("http://10.0.0.5:8080/hook", ("10.0.0.5:80",)),
        ("http://[::1]:8081/hook", ("[::1]:8080",)),
        ("http://other/hook", ("receiver", "receiver:9000")),
        ("http://receiver.evil.example/hook", ("receiver",)),
    ],
)
def test_a_listed_host_on_another_port_or_a_lookalike_is_still_refused(
    url: str, allowed: tuple[str, ...]
) -> None:
    assert "OVIS_WEBHOOK_ALLOWED_HOSTS" in refusal(url, allowed, "10.0.0.5")


# ---- delivery to a real receiver on 127.0.0.1 ----


@dataclass
class Arrival:
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """Answers each POST with the next of `replies` (the last one repeats) and records it."""

    replies: list[tuple[int, dict[str, str]]]
    arrivals: list[Arrival] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/ovis"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def receive() -> Iterator[Callable[..., Receiver]]:
    servers: list[tuple[ThreadingHTTPServer, threading.Thread]] = []

    def start(*replies: tuple[int, dict[str, str]]) -> Receiver:
        receiver = Receiver(list(replies) or [(200, {})])
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                with lock:
                    receiver.arrivals.append(
                        Arrival({k.lower(): v for k, v in self.headers.items()}, body, time.time())
                    )
                    index = min(len(receiver.arrivals), len(receiver.replies)) - 1
                status, headers = receiver.replies[index]
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append((server, thread))
        receiver.port = server.server_address[1]
        return receiver

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join()


def deliver(
    url: str,
    allowed: tuple[str, ...],
    *,
    resolve: Resolver = resolve_addresses,
    transport: httpx.AsyncBaseTransport | None = None,
) -> bool:
    async def scenario() -> bool:
        sender = WebhookSender(SECRET, allowed, delays=FAST, resolve=resolve, transport=transport)
        try:
            return await sender.deliver(url, "msg_2Kq", PAYLOAD)
        finally:
            await sender.aclose()

    return asyncio.run(scenario())


def test_a_delivery_arrives_signed_and_verifies(receive: Callable[..., Receiver]) -> None:
    receiver = receive((204, {}))
    with capture_logs() as logs:
        assert deliver(receiver.url, (receiver.host,))
    [arrival] = receiver.arrivals
    assert arrival.body == PAYLOAD
    assert arrival.headers["content-type"] == "application/json"
    assert arrival.headers["user-agent"] == "ovis-service"
    assert arrival.headers["webhook-id"] == "msg_2Kq"
    assert abs(int(arrival.headers["webhook-timestamp"]) - time.time()) < 30
    assert Webhook(SECRET).verify(arrival.body, arrival.headers) == json.loads(PAYLOAD)
    with pytest.raises(Exception, match="signature"):
        Webhook("whsec_" + "A" * 32).verify(arrival.body, arrival.headers)
    assert [(e["event"], e["attempt"], e["status"]) for e in logs] == [
        ("webhook_delivered", 1, 204)
    ]
    assert logs[0]["webhook_id"] == "msg_2Kq"
    assert SECRET not in repr(logs)
    assert "succeeded" not in repr(logs)


def test_a_server_error_is_retried_with_the_same_id(receive: Callable[..., Receiver]) -> None:
    receiver = receive((500, {}), (200, {}))
    with capture_logs() as logs:
        assert deliver(receiver.url, (receiver.host,))
    first, second = receiver.arrivals
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == "msg_2Kq"
    for arrival in (first, second):
        Webhook(SECRET).verify(arrival.body, arrival.headers)
    assert [(e["event"], e["attempt"], e["status"]) for e in logs] == [
        ("webhook_retry", 1, 500),
        ("webhook_delivered", 2, 200),
    ]


@pytest.mark.parametrize("status", [400, 404, 410, 302])
def test_a_client_error_or_redirect_is_final(receive: Callable[..., Receiver], status: int) -> None:
    receiver = receive((status, {"location": "http://127.0.0.1:1/elsewhere"}), (200, {}))
    with capture_logs() as logs:
        assert not deliver(receiver.url, (receiver.host,))
    assert len(receiver.arrivals) == 1
    assert [(e["event"], e["attempt"], e["status"]) for e in logs] == [
        ("webhook_failed", 1, status)
    ]


def test_retries_run_out_against_a_receiver_that_stays_failing(
    receive: Callable[..., Receiver],
) -> None:
    receiver = receive((503, {}))
    assert not deliver(receiver.url, (receiver.host,))
    assert len(receiver.arrivals) == 3


def test_a_receiver_that_is_down_exhausts_the_retries() -> None:
    # Bound but not listening: a connection to it is refused at once, and nothing else can
    # take the port while the test runs.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        host = f"127.0.0.1:{closed.getsockname()[1]}"
        with capture_logs() as logs:
            assert not deliver(f"http://{host}/hook", (host,))
    assert [(e["event"], e["attempt"], e["error"]) for e in logs] == [
        ("webhook_retry", 1, "ConnectError"),
        ("webhook_retry", 2, "ConnectError"),
        ("webhook_failed", 3, "ConnectError"),
    ]


def test_retry_after_is_honoured(receive: Callable[..., Receiver]) -> None:
    receiver = receive((429, {"retry-after": "1"}), (200, {}))
    with capture_logs() as logs:
        assert deliver(receiver.url, (receiver.host,))
    first, second = receiver.arrivals
    assert second.at - first.at >= 0.9  # the scheduled delay was 0.05 s
    assert logs[0]["delay"] == 1.0


def test_loopback_is_refused_unless_listed(receive: Callable[..., Receiver]) -> None:
    receiver = receive((200, {}))
    with capture_logs() as logs:
        assert not deliver(receiver.url, ("127.0.0.1:1",))
    assert receiver.arrivals == []
    [failed] = logs
    assert failed["event"] == "webhook_failed"
    assert "127.0.0.1 is a loopback address" in failed["reason"]


# ---- delivery to public names, through an in-memory transport ----


def deliver_in_memory(
    answers: Callable[[], list[str]], replies: list[int]
) -> tuple[bool, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(replies[len(seen) - 1])

    delivered = deliver(
        "https://hooks.example:8443/ovis",
        (),
        resolve=lambda host, port: answers(),
        transport=httpx.MockTransport(handle),
    )
    return delivered, seen


def test_a_delivery_connects_to_the_address_it_checked() -> None:
    delivered, [request] = deliver_in_memory(lambda: [PUBLIC], [200])
    assert delivered
    assert request.url == httpx.URL(f"https://{PUBLIC}:8443/ovis")
    assert request.headers["host"] == "hooks.example:8443"
    assert request.extensions["sni_hostname"] == "hooks.example"


def test_a_name_that_turns_private_between_attempts_gets_no_more_requests() -> None:
    answers = iter([[PUBLIC], ["10.0.0.5"]])
    with capture_logs() as logs:
        delivered, seen = deliver_in_memory(lambda: next(answers), [503, 200])
    assert not delivered
    assert len(seen) == 1
    assert [e["event"] for e in logs] == ["webhook_retry", "webhook_failed"]
    assert "resolves to 10.0.0.5, a private address" in logs[-1]["reason"]


def test_a_sender_needs_a_secret() -> None:
    with pytest.raises(ValueError, match="OVIS_WEBHOOK_SECRET"):
        WebhookSender("", ())
