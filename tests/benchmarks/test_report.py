"""The speed benchmark's Markdown, for the sections docs/performance.md takes its tables from."""

from typing import Any

import pytest

from benchmarks.budgets import budget_scenario
from benchmarks.report import write_markdown
from benchmarks.speed import PRESETS, SECTIONS, main


def results(**sections: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "meta": {
            "model": "full",
            "device": "NVIDIA H200",
            "dtype": "bfloat16",
            "size": 1024,
            "torch": "2.11.0",
            "diffusers": "0.42.1",
            "date": "2026-12-01 00:00 UTC",
            "steps_timed": 4,
        },
        "flops": {},
        "components": {},
        "rows": [],
        "compile": {},
        "memory": [],
        "skipped": [],
        "failed": [],
    }
    data.update(sections)
    return data


def test_the_budget_table_shows_the_plan_its_peak_and_its_ratios() -> None:
    rows = [
        {"budget": "unlimited", "plan": "none", "compile": "regional", "plan_needs_gib": 20.6,
         "peak_reserved_gib": 19.9, "under_budget": True, "seconds_per_image": 9.1,
         "x_resident": 1.0, "x_floor": 1.4, "plan_at_max_2048": "none"},
        {"budget": "8 GiB", "error": "out of memory: CUDA out of memory"},
    ]  # fmt: skip
    text = write_markdown(results(budgets=rows))
    assert "| OVIS_GPU_MEMORY | plan auto picks | compile |" in text
    assert "| unlimited | none | regional | 20.6 | 19.9 | yes | 9.1 | 1.0x | 1.4 | none |" in text
    # A failed row keeps its place and says why.
    assert "| 8 GiB | out of memory: CUDA out of memory | n/a |" in text


def test_threads_and_compile_modes_have_tables() -> None:
    threads = [
        {"size": 512, "steps": 20, "images_per_min_1": 60.0, "images_per_min_2": 66.0,
         "two_vs_one": 1.1},
    ]  # fmt: skip
    modes = [
        {"mode": "regional, dynamic shapes (the service)", "first_call_s": 36.0,
         "seconds_per_image": 9.0, "vs_service": 1.0},
        {"mode": "regional, static shapes + CUDA graphs", "error": "RuntimeError: no"},
    ]  # fmt: skip
    text = write_markdown(results(threads=threads, compile_modes=modes))
    assert "| 512x512 | 20 | 60.0 | 66.0 | 1.1x |" in text
    assert "| regional, dynamic shapes (the service) | 36.0 | 9.0 | 1.0x |  |" in text
    assert "| regional, static shapes + CUDA graphs | n/a | n/a | n/a | RuntimeError: no |" in text


def test_budget_rows_run_the_service_defaults_under_the_budget_setting() -> None:
    settings = budget_scenario(12, 1024).settings()
    assert (settings.gpu_memory, settings.offload, settings.compile) == ("12GiB", "auto", "auto")
    assert settings.max_image_size == 1024
    assert budget_scenario(None, 1024).settings().gpu_memory == ""


def test_the_gpu_run_preset_names_known_sections_and_unknown_ones_are_refused() -> None:
    assert set(PRESETS["gpu-run"]) <= set(SECTIONS)
    with pytest.raises(SystemExit):
        main(["--model", "tiny", "--sections", "budget"])
