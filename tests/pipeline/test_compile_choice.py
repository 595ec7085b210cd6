"""What `OVIS_COMPILE` resolves to for each device and memory plan, and what is refused."""

import pytest
import torch
from structlog.testing import capture_logs

from ovis_service.config import Settings, SettingsError
from ovis_service.pipeline import DiffusersEngine
from ovis_service.pipeline.levers import Levers, resolve_compile
from ovis_service.pipeline.memory import Plan

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")
BLOCKS = 33


def plan(offload: str, resident_blocks: int = 0) -> Plan:
    return Plan(offload, resident_blocks, 0, "test")  # type: ignore[arg-type]


def chosen(compile_: str, device: torch.device, memory: Plan, **levers: str) -> str:
    value, _why = resolve_compile(Levers(compile=compile_, **levers), device, memory, BLOCKS)  # type: ignore[arg-type]
    return value


@pytest.mark.parametrize(
    ("memory", "expected"),
    [
        (plan("none"), "regional"),
        (plan("encoder"), "regional"),
        (plan("group", 20), "regional"),  # the resident blocks
        (plan("group", 0), "none"),
        (plan("model"), "none"),
        (plan("sequential"), "none"),
    ],
)
def test_auto_compiles_on_cuda_where_the_transformer_stays(memory: Plan, expected: str) -> None:
    assert chosen("auto", CUDA, memory) == expected


def test_auto_is_none_on_the_cpu_and_with_the_first_block_cache() -> None:
    value, why = resolve_compile(Levers(compile="auto"), CPU, plan("none"), BLOCKS)
    assert (value, why) == (
        "none",
        "auto: no GPU (on the CPU a compile costs more start-up than it saves)",
    )
    assert chosen("auto", CUDA, plan("none"), step_cache="first_block") == "none"
    assert chosen("auto", CUDA, plan("none"), step_cache="taylorseer") == "regional"


def test_the_reason_says_how_many_blocks_a_group_plan_compiles() -> None:
    _value, why = resolve_compile(Levers(compile="auto"), CUDA, plan("group", 20), BLOCKS)
    assert why == "auto: the 20/33 resident blocks"


def test_explicit_values_are_kept_where_they_can_run() -> None:
    for memory in (plan("none"), plan("encoder"), plan("group", 5), plan("model")):
        assert chosen("regional", CUDA, memory) == "regional"
        assert chosen("none", CUDA, memory) == "none"
    assert chosen("regional", CPU, plan("none")) == "regional"


def test_regional_compile_is_refused_with_sequential_offload_or_nothing_resident() -> None:
    with pytest.raises(
        SettingsError, match="OVIS_COMPILE=regional cannot be combined with OVIS_OFFLOAD=sequential"
    ):
        chosen("regional", CUDA, plan("sequential"))
    with pytest.raises(SettingsError, match="this budget keeps none there"):
        chosen("regional", CUDA, plan("group", 0))


def test_on_the_cpu_auto_resolves_to_none_and_is_reported() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    engine = DiffusersEngine(Settings(model="tiny", gpu_memory="8GiB"))
    with capture_logs() as logs:
        info = engine.load()
    assert info.levers["compile"] == "none"
    [choice] = [log for log in logs if log["event"] == "compile_chosen"]
    assert (choice["requested"], choice["chosen"]) == ("auto", "none")
    assert choice["reason"].startswith("auto: no GPU")
    [levers] = [log for log in logs if log["event"] == "levers_in_force"]
    assert levers["compile"] == "none"
    [ignored] = [log for log in logs if log["event"] == "gpu_only_setting_ignored"]
    assert (ignored["setting"], ignored["value"]) == ("OVIS_GPU_MEMORY", "8GiB")
    assert ignored["log_level"] == "warning"
    engine.release()
