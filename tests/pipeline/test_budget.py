"""The VRAM budget (`OVIS_GPU_MEMORY`) on fake device figures, and enforced on a real GPU."""

from collections.abc import Iterator

import pytest
import torch
from structlog.testing import capture_logs

from ovis_service.pipeline import budget
from ovis_service.pipeline.memory import GIB

TOTAL = 80 * GIB


def resolve(setting: str, free_gib: float = 79.0) -> budget.Budget:
    return budget.resolve(setting, free_bytes=int(free_gib * GIB), total_bytes=TOTAL)


def test_unset_means_what_is_free_and_nothing_is_capped() -> None:
    assert resolve("", free_gib=61.5) == budget.Budget(
        int(61.5 * GIB), False, "free memory (OVIS_GPU_MEMORY unset)"
    )


@pytest.mark.parametrize(
    ("setting", "expected"),
    [("12GiB", 12 * GIB), ("12GB", 12 * 10**9), ("12000MiB", 12000 * 2**20), ("0.25", 20 * GIB)],
)
def test_an_amount_or_a_fraction_of_the_card_is_enforced(setting: str, expected: int) -> None:
    assert resolve(setting) == budget.Budget(expected, True, f"OVIS_GPU_MEMORY={setting}")


def test_more_than_is_free_is_planned_as_what_is_free_and_said() -> None:
    with capture_logs() as logs:
        got = resolve("24GiB", free_gib=10)
    assert got == budget.Budget(10 * GIB, True, "OVIS_GPU_MEMORY=24GiB, capped by free memory")
    [warning] = logs
    assert warning["event"] == "gpu_memory_above_free"
    assert warning["log_level"] == "warning"
    assert (warning["wanted_gib"], warning["free_gib"]) == (24.0, 10.0)


def test_more_than_the_card_is_the_card() -> None:
    assert resolve("100GiB", free_gib=80).bytes == TOTAL


@pytest.fixture
def cuda_budget() -> Iterator[torch.device]:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    budget.forget()
    yield torch.device("cuda", 0)
    budget.forget()


@pytest.mark.gpu
def test_the_budget_caps_this_process_on_a_gpu(cuda_budget: torch.device) -> None:
    got = budget.device_budget("2GiB", cuda_budget)
    assert got.bytes == 2 * GIB
    assert budget.device_budget("4GiB", cuda_budget) is got  # once per device and process
    torch.cuda.empty_cache()
    with pytest.raises(torch.OutOfMemoryError):
        torch.empty(3 * GIB, dtype=torch.uint8, device=cuda_budget)
    torch.empty(GIB, dtype=torch.uint8, device=cuda_budget)  # within the budget
