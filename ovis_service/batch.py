"""`ovis-service batch PROMPTS.jsonl --out DIR`: one `POST /generate` per line, resumable.

Each non-blank line is a JSON object, sent as it is as the body of a native request. Each image
is written as soon as it arrives (`000042-<seed>.png`), through a temporary file and a rename,
and `DIR/results.jsonl` gets one record per finished line, appended and flushed at once. A
re-run reads that file and skips the lines whose last record is ok, whose image is still there
and whose text has not changed since; everything else is sent again.

503 and 429 are retried after `Retry-After`, and connection errors (a service restarting) after
a growing pause, up to `--max-retries` per line; any other error answer is final for its line.
Ctrl-C or SIGTERM stops at once: the lines in flight are not recorded, so a re-run sends them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import hashlib
import json
import os
import random
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx
from tqdm import tqdm

EXIT_OK = 0
EXIT_FAILED = 1  # at least one line failed
EXIT_USAGE = 2
EXIT_INTERRUPTED = 128  # plus the signal's number, as a shell reports it: 130 for SIGINT

DEFAULT_URL = "http://127.0.0.1:4201"
RESULTS_NAME = "results.jsonl"
_PARTIAL_PREFIX = ".partial-"  # a temporary image; never trusted, removed by the next run
_EXTENSIONS = {"png": "png", "webp": "webp", "jpeg": "jpg"}
_MEDIA_TYPES = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}
# 502 comes from a proxy in front while the service restarts: the next try may well pass. A
# 504 is the service's own deadline (OVIS_REQUEST_TIMEOUT): a line that ran past it would most
# likely run past it again, so it fails rather than burn the GPU twenty times.
_RETRYABLE = frozenset({429, 502, 503})
_BACKOFF_CAP_SECONDS = 30.0  # when the answer gives no Retry-After, or there was no answer
_RETRY_AFTER_CAP_SECONDS = 600.0  # the service's own default request deadline
_FAILURES_LISTED = 50


class UsageError(Exception):
    """A problem with the command line or its files: nothing was sent."""


@dataclass(frozen=True)
class Options:
    prompts: Path
    out: Path
    url: str
    api_key: str | None
    concurrency: int
    image_format: str
    max_retries: int
    timeout: float


@dataclass(frozen=True)
class Line:
    number: int  # 1-based, as an editor shows it
    body: bytes  # sent as it is
    digest: str  # tells a re-run whether the line changed since its record was written
    prompt: str | None = None
    error: str | None = None  # why the line is not a request (bad JSON, not an object)


@dataclass
class Tally:
    done: int = 0
    skipped: int = 0
    retries: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)


def read_lines(path: Path) -> list[Line]:
    lines = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        lines.append(_parse_line(number, raw))
    return lines


def _parse_line(number: int, raw: bytes) -> Line:
    digest = hashlib.sha256(raw.strip()).hexdigest()
    try:
        value = json.loads(raw)
    except UnicodeDecodeError:
        return Line(number, raw, digest, error="not UTF-8 text")
    except json.JSONDecodeError as exc:
        return Line(number, raw, digest, error=f"not valid JSON: {exc.msg} (column {exc.colno})")
    if not isinstance(value, dict):
        return Line(
            number, raw, digest, error=f"expected a JSON object, got {type(value).__name__}"
        )
    prompt = value.get("prompt")
    return Line(number, raw, digest, prompt=prompt if isinstance(prompt, str) else None)


class Results:
    """`results.jsonl`: the last record of each line decides whether a re-run skips it."""

    def __init__(self, out: Path) -> None:
        self.path = out / RESULTS_NAME
        self.last: dict[int, dict[str, Any]] = {}
        if self.path.exists():
            for text in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    record = json.loads(text)
                except json.JSONDecodeError:
                    continue  # a record cut short when a previous run was killed
                if isinstance(record, dict) and isinstance(record.get("line"), int):
                    self.last[record["line"]] = record
        self._file: TextIO | None = None

    def is_done(self, line: Line, out: Path) -> bool:
        record = self.last.get(line.number)
        return (
            record is not None
            and record.get("status") == "ok"
            and record.get("input_sha256") == line.digest
            and isinstance(record.get("file"), str)
            and (out / record["file"]).is_file()
        )

    def append(self, record: dict[str, Any]) -> None:
        if self._file is None:
            self._file = self.path.open("a", encoding="utf-8")
            if not _ends_a_line(self.path):
                self._file.write("\n")  # never glue a record onto one cut short
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _ends_a_line(path: Path) -> bool:
    """True for an empty file, or one whose last byte ends a line."""
    with path.open("rb") as file:
        if file.seek(0, os.SEEK_END) == 0:
            return True
        file.seek(-1, os.SEEK_END)
        return file.read(1) == b"\n"


def write_atomically(path: Path, data: bytes) -> None:
    """A reader (or a re-run) sees the whole image or none of it."""
    partial = path.with_name(_PARTIAL_PREFIX + path.name)
    with partial.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    partial.replace(path)


def retry_after_seconds(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_detail(response: httpx.Response) -> str:
    """The service's own `detail`, or the start of whatever else answered."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if not isinstance(detail, str):
        detail = response.text.strip()[:200] or response.reason_phrase
    if response.status_code == 401:
        detail += " (check --api-key or OVIS_API_KEY)"
    return f"HTTP {response.status_code}: {detail}"


class Batch:
    def __init__(self, options: Options, results: Results, progress: Any) -> None:
        self.options = options
        self.results = results
        self.progress = progress
        self.tally = Tally()

    async def run(self, todo: Iterable[Line]) -> None:
        pending = deque(todo)
        headers = {"Accept": _MEDIA_TYPES[self.options.image_format]}
        if self.options.api_key:
            headers["Authorization"] = f"Bearer {self.options.api_key}"
        timeout = httpx.Timeout(self.options.timeout, connect=10.0)
        limits = httpx.Limits(max_connections=self.options.concurrency)
        async with httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits) as client:
            await asyncio.gather(
                *(self._work(client, pending) for _ in range(self.options.concurrency))
            )

    async def _work(self, client: httpx.AsyncClient, pending: deque[Line]) -> None:
        while pending:
            line = pending.popleft()
            record = await self._send(client, line) if line.error is None else self._failed(line)
            # No await from here on: a cancelled line is never half recorded.
            self.results.append(record)
            if record["status"] == "ok":
                self.tally.done += 1
            else:
                self.tally.failures.append(record)
            self._show_counts(refresh=False)
            self.progress.update(1)

    async def _send(self, client: httpx.AsyncClient, line: Line) -> dict[str, Any]:
        url = self.options.url + "/generate"
        attempts = 0
        while True:
            attempts += 1
            status: int | None = None
            try:
                response = await client.post(
                    url, content=line.body, headers={"Content-Type": "application/json"}
                )
            except httpx.TransportError as exc:
                reason = str(exc) or type(exc).__name__
                error = f"could not reach {self.options.url}: {reason}"
                wait = None
            else:
                status = response.status_code
                if status == 200:
                    return self._save(line, response)
                error = error_detail(response)
                if status not in _RETRYABLE:
                    return self._failed(line, error, status)
                wait = retry_after_seconds(response)
            if attempts > self.options.max_retries:
                return self._failed(line, f"{error} (gave up after {attempts} tries)", status)
            if wait is None:
                wait = min(_BACKOFF_CAP_SECONDS, 2.0 ** (attempts - 1))
            # A little jitter, so that lines refused together do not all come back together.
            wait = min(wait, _RETRY_AFTER_CAP_SECONDS) * random.uniform(1.0, 1.2)  # noqa: S311
            self.tally.retries += 1
            self._show_counts()
            await asyncio.sleep(wait)

    def _show_counts(self, *, refresh: bool = True) -> None:
        failed, retries = len(self.tally.failures), self.tally.retries
        self.progress.set_postfix(failed=failed, retries=retries, refresh=refresh)

    def _save(self, line: Line, response: httpx.Response) -> dict[str, Any]:
        seed = response.headers.get("X-Seed", "")
        content_type = response.headers.get("Content-Type", "")
        if not seed.isdigit() or not content_type.startswith("image/"):
            error = f"expected an image with an X-Seed header, got {content_type or 'no type'}"
            return self._failed(line, f"{error}; is {self.options.url} an ovis-service?", 200)
        name = f"{line.number:06d}-{seed}.{_EXTENSIONS[self.options.image_format]}"
        write_atomically(self.options.out / name, response.content)
        return {
            "line": line.number,
            "status": "ok",
            "file": name,
            "seed": int(seed),
            "prompt": line.prompt,
            "input_sha256": line.digest,
        }

    def _failed(
        self, line: Line, error: str | None = None, http_status: int | None = None
    ) -> dict[str, Any]:
        return {
            "line": line.number,
            "status": "failed",
            "error": error or line.error,
            "http_status": http_status,
            "prompt": line.prompt,
            "input_sha256": line.digest,
        }


async def _run_until_signalled(batch: Batch, todo: list[Line]) -> int | None:
    """Run the batch; the signal's number if SIGINT or SIGTERM stopped it first."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(batch.run(todo))
    received: list[int] = []

    def stop(signum: int) -> None:
        received.append(signum)
        task.cancel()  # closes the connections in flight; the service stops those jobs

    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        with contextlib.suppress(NotImplementedError):  # Windows: Ctrl-C is KeyboardInterrupt
            loop.add_signal_handler(signum, stop, signum)
    try:
        await task
    except asyncio.CancelledError:
        if not received:
            raise
    finally:
        for signum in signals:
            with contextlib.suppress(NotImplementedError):
                loop.remove_signal_handler(signum)
    return received[0] if received else None


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ovis-service batch",
        description="Send each line of a JSONL file (a POST /generate body) to a running "
        "service, write each image as it arrives, and resume where a previous run stopped.",
        epilog="Exit status: 0 all lines done, 1 some failed (listed at the end), 2 usage "
        "error, 130 interrupted by Ctrl-C (re-run the same command to resume).",
    )
    parser.add_argument(
        "prompts",
        type=Path,
        metavar="PROMPTS.jsonl",
        help="JSONL file: one request object per line",
    )
    parser.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="directory for images and results"
    )
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the service (default {DEFAULT_URL})")
    parser.add_argument(
        "--api-key", metavar="KEY", help="bearer key (default: OVIS_API_KEY, if set)"
    )
    parser.add_argument(
        "--concurrency",
        type=_at_least(1),
        default=2,
        metavar="N",
        help="requests in flight (default 2)",
    )
    parser.add_argument(
        "--format",
        dest="image_format",
        choices=sorted(_EXTENSIONS),
        default="png",
        help="image format asked for with Accept (default png)",
    )
    parser.add_argument(
        "--max-retries",
        type=_at_least(0),
        default=20,
        metavar="N",
        help="retries per line after 503/429 or a connection error (default 20)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=900.0,
        metavar="SECONDS",
        help="seconds to wait for one answer, queue included (default 900)",
    )
    return parser.parse_args(argv)


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _options(args: argparse.Namespace) -> Options:
    url = args.url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"--url must start with http:// or https://, got {args.url!r}")
    if not args.prompts.is_file():
        raise UsageError(f"{args.prompts}: no such file")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out}: exists and is not a directory")
    # The service accepts several comma-separated keys; a client sends one of them.
    api_key = args.api_key or os.environ.get("OVIS_API_KEY", "").split(",")[0].strip() or None
    return Options(
        prompts=args.prompts,
        out=args.out,
        url=url,
        api_key=api_key,
        concurrency=args.concurrency,
        image_format=args.image_format,
        max_retries=args.max_retries,
        timeout=args.timeout,
    )


def main(argv: Sequence[str]) -> int:
    try:
        options = _options(_parse_args(argv))
        lines = read_lines(options.prompts)
        options.out.mkdir(parents=True, exist_ok=True)
    except (UsageError, OSError) as exc:
        print(f"ovis-service batch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for stale in options.out.glob(_PARTIAL_PREFIX + "*"):
        stale.unlink(missing_ok=True)  # left by a run that was killed mid-write
    results = Results(options.out)
    todo = [line for line in lines if not results.is_done(line, options.out)]
    progress = tqdm(total=len(todo), unit="img", desc="batch", file=sys.stderr, dynamic_ncols=True)
    batch = Batch(options, results, progress)
    batch.tally.skipped = len(lines) - len(todo)
    try:
        signum = asyncio.run(_run_until_signalled(batch, todo))
    finally:
        progress.close()
        results.close()
    return _report(batch.tally, results.path, len(todo), signum)


def _report(tally: Tally, results_path: Path, todo: int, signum: int | None) -> int:
    counts = f"done {tally.done}, skipped {tally.skipped}, failed {len(tally.failures)}"
    if signum is not None:
        unfinished = todo - tally.done - len(tally.failures)
        print(
            f"interrupted: {counts}, not finished {unfinished}; run the same command again "
            f"to resume (results in {results_path})"
        )
    else:
        print(f"{counts} (results in {results_path})")
    if tally.failures:
        print("failed lines:")
        for record in sorted(tally.failures, key=lambda r: r["line"])[:_FAILURES_LISTED]:
            print(f"  line {record['line']}: {record['error']}")
        if len(tally.failures) > _FAILURES_LISTED:
            print(f"  ... and {len(tally.failures) - _FAILURES_LISTED} more in {results_path}")
    if signum is not None:
        return EXIT_INTERRUPTED + signum
    return EXIT_FAILED if tally.failures else EXIT_OK
