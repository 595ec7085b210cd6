"""Figures measured by the reliability suite: collected while the tests run, printed as one
table at the end of the session and, when `RELIABILITY_REPORT` names a file, written there as
JSON too (scripts/reliability.sh uses that to build the table in docs/reliability.md)."""

import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

REPORT_ENV = "RELIABILITY_REPORT"


@dataclass(frozen=True)
class Figure:
    section: str
    name: str
    value: str


@dataclass
class FigureBook:
    figures: list[Figure] = field(default_factory=list)

    def add(self, section: str, name: str, value: object) -> None:
        self.figures.append(Figure(section, name, str(value)))

    def table(self) -> str:
        if not self.figures:
            return ""
        width = max(len(f"{f.section} / {f.name}") for f in self.figures)
        lines = [f"{f'{f.section} / {f.name}':<{width}}  {f.value}" for f in self.figures]
        return "\n".join(lines)

    def write(self, path: Path) -> None:
        """Merge into an existing report, so that a quick run and a soak run can share a file."""
        existing: list[dict[str, str]] = []
        if path.exists():
            existing = json.loads(path.read_text())["figures"]
        mine = {(f.section, f.name) for f in self.figures}
        kept = [f for f in existing if (f["section"], f["name"]) not in mine]
        report = {
            "written_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": machine(),
            "figures": kept + [asdict(f) for f in self.figures],
        }
        path.write_text(json.dumps(report, indent=2) + "\n")


def machine() -> str:
    cpu = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = ", ".join(
        f"{name} {_version(name)}" for name in ("torch", "diffusers", "litestar", "uvicorn")
    )
    return (
        f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, {versions}"
    )


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "-"


def markdown(report: dict[str, Any]) -> str:
    """The report as the Markdown table that docs/reliability.md holds."""
    lines = [
        f"Measured {report['written_at']} on {report['machine']}.",
        "",
        "| Section | Figure | Value |",
        "|---|---|---|",
    ]
    for figure in sorted(report["figures"], key=lambda f: f["section"]):
        value = figure["value"].replace("|", "/")
        lines.append(f"| {figure['section']} | {figure['name']} | {value} |")
    return "\n".join(lines)


BOOK = FigureBook()


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile: the smallest value with at least `pct`% of values at or below."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def latency_summary(values: Sequence[float]) -> str:
    return f"p50 {ms(percentile(values, 50))}, p99 {ms(percentile(values, 99))}, n={len(values)}"


if __name__ == "__main__":
    # python -m tests.reliability.figures REPORT.json: print the report as Markdown.
    print(markdown(json.loads(Path(sys.argv[1]).read_text())))
