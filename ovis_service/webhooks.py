"""Webhooks: which URLs may receive them, and signed delivery with retries.

A webhook URL comes from a client, so the service must not become a way to reach its own
network: every address the host resolves to has to be public, unless an operator lists the
host in OVIS_WEBHOOK_ALLOWED_HOSTS. Deliveries follow Standard Webhooks (webhook-id,
webhook-timestamp, webhook-signature) and connect to the very address that was checked, so a
DNS answer that changes between the check and the connection cannot redirect them.
"""

import asyncio
import ipaddress
import socket
import time
from collections.abc import Callable, Collection, Sequence
from datetime import datetime, timezone

import httpx
import structlog
from standardwebhooks.webhooks import Webhook

from ovis_service.config import env_name
from ovis_service.errors import BadRequestError

logger = structlog.get_logger(__name__)

Resolver = Callable[[str, int], list[str]]
"""`resolve(host, port)` -> the IP addresses, as strings, that `host` resolves to."""

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_URL_LENGTH = 2048
USER_AGENT = "ovis-service"
MAX_RETRY_AFTER = 60.0  # seconds; a receiver may not park a delivery for longer
_RETRY_STATUSES = frozenset({408, 429})  # and every 5xx

_DEFAULT_PORTS = {"http": 80, "https": 443}
_METADATA_NAMES = frozenset({"metadata.google.internal"})
_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT, RFC 6598
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the last 32 bits are an IPv4 host
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated ::a.b.c.d
_DOCUMENTATION = tuple(
    ipaddress.ip_network(n)
    for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32", "3fff::/20")
)


def resolve_addresses(host: str, port: int) -> list[str]:
    """Every address `host` resolves to; looks the name up without connecting anywhere."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def check_webhook_url(
    url: str, allowed_hosts: Collection[str], *, resolve: Resolver = resolve_addresses
) -> None:
    """Raise BadRequestError(detail, param="webhook") when `url` may not receive webhooks.

    Resolves the host with `resolve`, which blocks: call it from a thread in async code.
    """
    _vet(url, allowed_hosts, resolve)


def _vet(url: str, allowed_hosts: Collection[str], resolve: Resolver) -> list[str] | None:
    """The checked addresses to connect to, or None when the URL's host is used as it is (an
    IP literal, or a host on the allow list)."""
    host, port = _host_and_port(url)
    if _allowed(host, port, allowed_hosts):
        return None
    if host in _METADATA_NAMES:
        raise _refuse(_not_public(f"{host} is a cloud metadata service"))
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        reason = _refusal(literal)
        if reason:
            raise _refuse(_not_public(f"{host} is {reason}"))
        return None
    try:
        answers = resolve(host, port)
    except (OSError, UnicodeError):  # socket.gaierror, or a label IDNA cannot encode
        answers = []
    if not answers:
        raise _refuse(f"{host} does not resolve")
    for answer in answers:
        reason = _refusal(ipaddress.ip_address(answer))
        if reason:
            raise _refuse(_not_public(f"{host} resolves to {answer}, {reason}"))
    return answers


def _host_and_port(url: str) -> tuple[str, int]:
    """The URL's host (lower case, IDNA-encoded, IPv6 without brackets) and port."""
    if len(url) > MAX_URL_LENGTH:
        raise _refuse(f"the URL is longer than {MAX_URL_LENGTH} characters")
    try:
        # httpx's own parser, so the host checked is the host the request goes to.
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        raise _refuse("not a valid URL") from None
    if parsed.scheme not in _DEFAULT_PORTS:
        raise _refuse("the URL must start with http:// or https://")
    if parsed.userinfo:
        raise _refuse("the URL may not carry a user name or password")
    host = parsed.raw_host.decode("ascii").lower().rstrip(".")
    if not host:
        raise _refuse("the URL has no host")
    port = _DEFAULT_PORTS[parsed.scheme] if parsed.port is None else parsed.port
    if not 0 < port < 65536:
        raise _refuse(f"{port} is not a valid port")
    return host, port


def _allowed(host: str, port: int, allowed_hosts: Collection[str]) -> bool:
    # IPv6 may be listed bare (::1) or in brackets ([::1], [::1]:8080).
    ipv6 = ":" in host
    names = {host, f"[{host}]", f"[{host}]:{port}"} if ipv6 else {host, f"{host}:{port}"}
    return not names.isdisjoint(allowed_hosts)


def _refusal(ip: IPAddress) -> str | None:
    """Why a webhook may not go to `ip`, as a noun phrase, or None when it is public."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            # These forms reach the IPv4 host itself, which alone decides.
            reason = _refusal(inner)
            return f"an IPv6 form of {inner}, {reason}" if reason else None
        # 6to4 and Teredo tunnel to the IPv4 hosts they carry; those must be public too.
        for end in [ip.sixtofour] if ip.sixtofour else list(ip.teredo or ()):
            reason = _refusal(end)
            if reason:
                return f"a tunnel to {end}, {reason}"
    return next((reason for applies, reason in _RULES if applies(ip)), None)


# In order: the first that applies names the refusal.
_RULES: tuple[tuple[Callable[[IPAddress], bool], str], ...] = (
    (lambda ip: ip in _METADATA_ADDRESSES, "a cloud metadata address"),
    (lambda ip: ip.is_unspecified, "an unspecified address"),
    (lambda ip: ip.is_loopback, "a loopback address"),
    (lambda ip: ip.is_link_local, "a link-local address"),
    (lambda ip: ip.is_multicast, "a multicast address"),  # ipaddress calls some global
    (lambda ip: ip in _SHARED, "a carrier-grade NAT address"),
    (lambda ip: any(ip in net for net in _DOCUMENTATION), "a documentation address"),
    (lambda ip: ip.is_reserved, "a reserved address"),
    (lambda ip: ip.is_private, "a private address"),
    (lambda ip: not ip.is_global, "not a public address"),
)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):  # :: and ::1 are their own
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _not_public(what: str) -> str:
    return (
        f"{what}; webhooks may only go to public addresses unless the host is listed in "
        f"{env_name('webhook_allowed_hosts')}"
    )


def _refuse(rule: str) -> BadRequestError:
    return BadRequestError(f"webhook: {rule}", param="webhook")


class WebhookSender:
    """POSTs signed JSON to webhook URLs, retrying what a later attempt may fix."""

    def __init__(
        self,
        secret: str,
        allowed_hosts: Collection[str],
        *,
        delays: Sequence[float] = (1, 2, 4, 8, 16, 32),
        timeout: float = 10.0,
        resolve: Resolver = resolve_addresses,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not secret:
            raise ValueError(f"webhooks need a signing secret: set {env_name('webhook_secret')}")
        self._signer = Webhook(secret)
        self._allowed_hosts = frozenset(allowed_hosts)
        self._delays = tuple(delays)
        self._timeout = timeout
        self._resolve = resolve
        self._client = httpx.AsyncClient(
            transport=transport,
            timeout=timeout,
            follow_redirects=False,  # a redirect could point anywhere, unchecked
            trust_env=False,  # the checked address is the one connected to, never a proxy
            headers={"user-agent": USER_AGENT},
        )

    async def deliver(self, url: str, message_id: str, payload: bytes) -> bool:
        """POST `payload` to `url` until it is accepted or the retries run out; True when a
        2xx came back. The same `message_id` on every attempt lets the receiver deduplicate."""
        log = logger.bind(webhook_id=message_id)
        attempts = len(self._delays) + 1
        for attempt in range(1, attempts + 1):
            try:
                # Again on every attempt: the name's addresses may have changed since.
                addresses = await asyncio.to_thread(_vet, url, self._allowed_hosts, self._resolve)
            except BadRequestError as exc:
                log.warning("webhook_failed", attempt=attempt, status=None, reason=exc.detail)
                return False
            pin = addresses[(attempt - 1) % len(addresses)] if addresses else None
            status: int | None = None
            error: str | None = None
            wait: float | None = None
            try:
                response = await asyncio.wait_for(
                    self._post(url, pin, message_id, payload), self._timeout
                )
            except (httpx.TransportError, asyncio.TimeoutError) as exc:
                error = type(exc).__name__
            else:
                status = response.status_code
                if 200 <= status < 300:
                    log.info("webhook_delivered", attempt=attempt, status=status)
                    return True
                if status not in _RETRY_STATUSES and status < 500:
                    log.warning("webhook_failed", attempt=attempt, status=status)
                    return False
                wait = _retry_after(response)
            if attempt == attempts:
                log.warning("webhook_failed", attempt=attempt, status=status, error=error)
                return False
            delay = self._delays[attempt - 1] if wait is None else wait
            log.info("webhook_retry", attempt=attempt, status=status, error=error, delay=delay)
            await asyncio.sleep(delay)
        return False  # unreachable: the last attempt returns above

    async def _post(
        self, url: str, pin: str | None, message_id: str, payload: bytes
    ) -> httpx.Response:
        target = httpx.URL(url)
        # A fresh timestamp each attempt: receivers refuse signatures older than a few minutes.
        sent_at = datetime.fromtimestamp(int(time.time()), tz=timezone.utc)
        headers = {
            "content-type": "application/json",
            "webhook-id": message_id,
            "webhook-timestamp": str(int(sent_at.timestamp())),
            "webhook-signature": self._signer.sign(message_id, sent_at, payload.decode()),
        }
        extensions: dict[str, str] = {}
        if pin is not None:
            # Connect to the checked address, while the receiver sees (and TLS verifies) the
            # name it was given.
            headers["host"] = target.netloc.decode("ascii")
            if target.scheme == "https":
                extensions["sni_hostname"] = target.raw_host.decode("ascii")
            target = target.copy_with(host=pin)
        async with self._client.stream(
            "POST", target, content=payload, headers=headers, extensions=extensions
        ) as response:
            return response  # the status and headers are all that is read, never the body

    async def aclose(self) -> None:
        await self._client.aclose()


def _retry_after(response: httpx.Response) -> float | None:
    """A Retry-After given in seconds, capped; HTTP dates fall back to the usual delay."""
    value = response.headers.get("retry-after", "").strip()
    return min(float(value), MAX_RETRY_AFTER) if value.isdigit() else None
