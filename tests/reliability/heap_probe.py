"""The real service (`create_app` and `run_server`, as `ovis-service` runs them) plus a probe
thread that reports what RSS cannot tell apart: the bytes malloc has handed out and not got back
(`mallinfo2().uordblks`) and the number of Python objects the collector tracks.

`python -m tests.reliability.heap_probe`, with `HEAP_PROBE_DIR` naming a directory: for each file
`request-N` that appears there, the probe writes `answer-N` (JSON) and waits for the next one.
The soak asks only while no request is in flight.
"""

import ctypes
import gc
import json
import os
import threading
import time
from pathlib import Path

from ovis_service.app import create_app
from ovis_service.cli import run_server
from ovis_service.config import load_settings
from ovis_service.logs import configure_logging


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def heap() -> dict[str, int]:
    libc = ctypes.CDLL("libc.so.6")  # glibc 2.33 or later, as on Debian 12 and Ubuntu 22.04
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    gc.collect()
    return {
        "heap_in_use": info.uordblks + info.hblkhd,  # arenas in use, plus mmapped blocks
        "heap_free_in_arenas": info.fordblks,  # freed but kept: fragmentation shows here
        "objects": len(gc.get_objects()),
    }


def _answer(directory: Path) -> None:
    n = 0
    while True:
        if (directory / f"request-{n}").exists():
            partial = directory / f"answer-{n}.partial"
            partial.write_text(json.dumps(heap()))
            partial.rename(directory / f"answer-{n}")
            n += 1
        time.sleep(0.02)


def ask(directory: Path, n: int, timeout: float = 30.0) -> dict[str, int]:
    """The test's side: the `n`-th question, and its answer."""
    (directory / f"request-{n}").touch()
    answer = directory / f"answer-{n}"
    deadline = time.monotonic() + timeout
    while not answer.exists():
        if time.monotonic() > deadline:
            raise TimeoutError("the heap probe did not answer")
        time.sleep(0.02)
    result: dict[str, int] = json.loads(answer.read_text())
    return result


def main() -> int:
    settings = load_settings()
    configure_logging(settings.log_level)
    directory = Path(os.environ["HEAP_PROBE_DIR"])
    threading.Thread(target=_answer, args=(directory,), name="heap-probe", daemon=True).start()
    app = create_app(settings)
    return run_server(app, settings, host=settings.host, port=settings.port)


if __name__ == "__main__":
    raise SystemExit(main())
