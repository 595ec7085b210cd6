"""A raw HTTP/1.1 client over a socket, for requests that well-behaved clients refuse to send:
bad bytes, lying headers, bodies larger than the server allows."""

import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-cased names; the last value wins
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


class NoResponseError(Exception):
    """The server closed or reset the connection without a complete response."""


def _address(base_url: str) -> tuple[str, int]:
    parts = urlsplit(base_url)
    assert parts.hostname == "127.0.0.1", "the suite talks to loopback only"
    assert parts.port is not None
    return parts.hostname, parts.port


def send(
    base_url: str,
    head: bytes,
    body: bytes | Iterable[bytes] = b"",
    *,
    timeout: float = 30.0,
) -> RawResponse:
    """Send `head` (request line and headers, without the blank line) and `body`, then read one
    response. An iterable body is sent chunk by chunk from a second thread while this one reads,
    so that an early answer (413) is seen even if the server stops reading."""
    with socket.create_connection(_address(base_url), timeout=timeout) as sock:
        sock.sendall(head + b"\r\n\r\n")
        if isinstance(body, bytes):
            if body:
                sock.sendall(body)
            return _read_response(sock)
        sender = threading.Thread(target=_send_chunks, args=(sock, body), daemon=True)
        sender.start()
        try:
            return _read_response(sock)
        finally:
            sender.join(timeout=timeout)


def _send_chunks(sock: socket.socket, chunks: Iterable[bytes]) -> None:
    try:
        for chunk in chunks:
            sock.sendall(chunk)
    except OSError:
        pass  # the server answered and closed; the reader has the answer


def chunked(payload: bytes, chunk_size: int) -> Iterable[bytes]:
    """`payload` in Transfer-Encoding: chunked framing."""
    for start in range(0, len(payload), chunk_size):
        piece = payload[start : start + chunk_size]
        yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    yield b"0\r\n\r\n"


def _read_response(sock: socket.socket) -> RawResponse:
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            piece = sock.recv(65536)
            if not piece:
                raise NoResponseError(f"connection closed after {len(data)} bytes: {data[:200]!r}")
            data += piece
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = headers.get("content-length")
        if length is not None:
            while len(rest) < int(length):
                piece = sock.recv(65536)
                if not piece:
                    raise NoResponseError("connection closed inside the body")
                rest += piece
            rest = rest[: int(length)]
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            rest = _read_chunked(sock, rest)
        return RawResponse(status, headers, rest)
    except (ConnectionResetError, BrokenPipeError) as exc:
        raise NoResponseError(f"{type(exc).__name__} after {len(data)} bytes") from exc


def _read_chunked(sock: socket.socket, data: bytes) -> bytes:
    body = b""
    while True:
        while b"\r\n" not in data:
            piece = sock.recv(65536)
            if not piece:
                raise NoResponseError("connection closed inside a chunk size")
            data += piece
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        while len(data) < size + 2:
            piece = sock.recv(65536)
            if not piece:
                raise NoResponseError("connection closed inside a chunk")
            data += piece
        if size == 0:
            return body
        body += data[:size]
        data = data[size + 2 :]


def post_head(
    path: str,
    *extra: str,
    content_type: str | None = "application/json",
    length: int | None = None,
) -> bytes:
    """Request line and headers of a POST; `length` adds a Content-Length header."""
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines.extend(extra)
    return "\r\n".join(lines).encode("latin-1")


def post(
    base_url: str,
    path: str,
    body: bytes,
    *extra: str,
    content_type: str | None = "application/json",
    timeout: float = 30.0,
) -> RawResponse:
    """A POST with a body sent in one piece and an honest Content-Length."""
    head = post_head(path, *extra, content_type=content_type, length=len(body))
    return send(base_url, head, body, timeout=timeout)
