"""Memory plans on fake sizes shaped like Ovis-Image-7B in bf16: which plan `auto` picks for each
card size and budget, and whether several copies fit one device."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ovis_service.config import SettingsError
from ovis_service.pipeline.memory import (
    GIB,
    STREAM_DEPTH,
    ComponentSizes,
    WeightsSize,
    activation_headroom,
    check_fit,
    choose_plan,
    component_sizes,
    estimate_weights,
    largest_image_that_fits,
    needs,
    plan_placement,
)
from ovis_service.pipeline.tiny import build_tiny_pipeline

# Transformer 7.37 B params + Qwen3 1.72 B + VAE, in bf16 (two bytes per parameter).
OVIS_WEIGHTS = int((7.37e9 + 1.72e9 + 0.08e9) * 2)
OVIS_LARGEST = int(7.37e9 * 2)
HEADROOM_1024 = activation_headroom(1024)
HEADROOM_DEFAULT = activation_headroom(2048)  # OVIS_MAX_IMAGE_SIZE defaults to 2048

# The transformer as blocks: 6 double-stream blocks about twice the size of the 27 single ones,
# plus embedders and the output layer outside any block.
OUTSIDE_BLOCKS = int(0.2e9 * 2)
SINGLE = (OVIS_LARGEST - OUTSIDE_BLOCKS) // (27 + 2 * 6)
OVIS = ComponentSizes(
    transformer=OVIS_LARGEST,
    text_encoder=int(1.72e9 * 2),
    vae=int(0.08e9 * 2),
    blocks=(2 * SINGLE,) * 6 + (SINGLE,) * 27,
)


def auto(budget_gib: float, headroom: int = HEADROOM_DEFAULT, sizes: ComponentSizes = OVIS) -> str:
    plan = choose_plan(
        "auto",
        sizes,
        on_cuda=True,
        budget_bytes=int(budget_gib * GIB),
        headroom_bytes=headroom,
    )
    return plan.offload if plan else "refused"


@pytest.mark.parametrize(
    ("card", "budget_gib", "expected"),
    [
        ("H100 80 GB", 78.5, "none"),
        ("A100 40 GB", 39.0, "none"),
        ("RTX 4090 24 GB", 22.8, "encoder"),
        ("RTX 4080 16 GB", 15.2, "group"),
        ("RTX 3060 12 GB", 11.4, "group"),
        ("8 GB card", 7.6, "refused"),  # 8 GiB of headroom for a 2048x2048 image
    ],
)
def test_auto_picks_the_fastest_plan_that_fits_the_budget(
    card: str, budget_gib: float, expected: str
) -> None:
    assert auto(budget_gib) == expected, card


@pytest.mark.parametrize(
    ("budget_gib", "expected"),
    [
        (None, "none"),
        (24, "none"),
        (18, "encoder"),
        (16, "group"),
        (12, "group"),
        (8, "group"),
        (4, "sequential"),
    ],
)
def test_auto_per_budget_for_1024_images(budget_gib: float | None, expected: str) -> None:
    """The budgets the speed benchmark emulates, with OVIS_MAX_IMAGE_SIZE=1024."""
    assert auto(budget_gib or 140, headroom=HEADROOM_1024) == expected


def test_group_keeps_as_many_blocks_resident_as_fit_and_more_with_a_larger_budget() -> None:
    kept = {}
    for budget_gib in (8, 12, 16):
        plan = choose_plan(
            "auto",
            OVIS,
            on_cuda=True,
            budget_bytes=budget_gib * GIB,
            headroom_bytes=HEADROOM_1024,
        )
        assert plan is not None
        assert plan.offload == "group"
        assert plan.needs_bytes <= budget_gib * GIB
        # One more block would not fit (or every block would, which is `encoder`'s job).
        one_more = needs("group", OVIS, HEADROOM_1024, plan.resident_blocks + 1)
        assert one_more > budget_gib * GIB or plan.resident_blocks + 1 == len(OVIS.blocks)
        kept[budget_gib] = plan.resident_blocks
    assert 0 < kept[8] < kept[12] < kept[16] < len(OVIS.blocks)


def test_each_plan_needs_less_than_the_one_before_it() -> None:
    order = ("none", "encoder", "model", "sequential")
    figures = [needs(plan, OVIS, HEADROOM_1024) for plan in order]  # type: ignore[arg-type]
    assert figures == sorted(figures, reverse=True)
    assert needs("group", OVIS, HEADROOM_1024, 0) < needs("model", OVIS, HEADROOM_1024)
    # Streaming every block holds only a few of them at once.
    streamed_all = needs("group", OVIS, HEADROOM_1024, 0)
    outside_blocks = OVIS.transformer - sum(OVIS.blocks)
    assert streamed_all - HEADROOM_1024 - OVIS.vae - outside_blocks == STREAM_DEPTH * 2 * SINGLE


def test_the_plan_is_sized_for_the_largest_allowed_image() -> None:
    assert activation_headroom(2048) > activation_headroom(1024) > activation_headroom(512)
    # A 24 GB card keeps everything resident when requests stop at 1024x1024 ...
    assert auto(22.8, headroom=HEADROOM_1024) == "none"
    # ... but lets the text encoder go when they may reach 2048x2048.
    assert auto(22.8, headroom=HEADROOM_DEFAULT) == "encoder"


def test_without_block_sizes_or_with_fp8_group_is_not_chosen() -> None:
    unknown_blocks = OVIS._replace(blocks=())
    assert auto(12, headroom=HEADROOM_1024, sizes=unknown_blocks) == "sequential"
    plan = choose_plan(
        "auto",
        OVIS,
        on_cuda=True,
        budget_bytes=12 * GIB,
        headroom_bytes=HEADROOM_1024,
        streamable=False,
    )
    assert plan is not None
    assert plan.offload == "sequential"


def test_the_reason_names_the_figures_and_the_faster_plans_that_did_not_fit() -> None:
    plan = choose_plan(
        "auto", OVIS, on_cuda=True, budget_bytes=16 * GIB, headroom_bytes=HEADROOM_1024
    )
    assert plan is not None
    assert plan.reason.startswith(f"needs {plan.needs_bytes / GIB:.1f} GiB of 16.0 GiB")
    assert plan.reason.endswith("none, encoder, model would not fit")


def test_an_explicit_plan_wins_over_the_budget() -> None:
    for mode in ("none", "encoder", "group", "model", "sequential"):
        plan = choose_plan(mode, OVIS, on_cuda=True, budget_bytes=0, headroom_bytes=HEADROOM_1024)
        assert plan is not None
        assert (plan.offload, plan.reason) == (mode, "asked for")


def test_the_cpu_never_offloads() -> None:
    plan = choose_plan(
        "sequential", OVIS, on_cuda=False, budget_bytes=0, headroom_bytes=HEADROOM_1024
    )
    assert plan is not None
    assert plan.offload == "none"


def test_a_budget_too_small_for_any_plan_stops_startup_naming_ovis_gpu_memory() -> None:
    pipe = build_tiny_pipeline()
    with pytest.raises(SettingsError) as refused:
        plan_placement(pipe, "auto", torch.device("cuda", 0), budget_bytes=GIB, max_image_size=1024)
    message = str(refused.value)
    assert message.startswith(
        "the memory budget (OVIS_GPU_MEMORY, or what is free when it is unset) leaves 1.0 GiB "
        "for each copy of the model on cuda:0"
    )
    assert "even OVIS_OFFLOAD=sequential needs about 3.5 GiB" in message
    # Not even the smallest allowed image fits in 1 GiB.
    assert "; lower OVIS_MAX_IMAGE_SIZE, raise OVIS_GPU_MEMORY" in message


def test_a_refusal_names_the_largest_image_size_that_would_fit() -> None:
    pipe = build_tiny_pipeline()
    with pytest.raises(SettingsError) as refused:
        plan_placement(
            pipe, "auto", torch.device("cuda", 0), budget_bytes=int(7.6 * GIB), max_image_size=2048
        )
    fits = largest_image_that_fits(component_sizes(pipe), int(7.6 * GIB))
    assert fits is not None
    assert 1024 < fits < 2048
    assert fits % 16 == 0
    assert needs("sequential", component_sizes(pipe), activation_headroom(fits)) <= 7.6 * GIB
    assert needs("sequential", component_sizes(pipe), activation_headroom(fits + 16)) > 7.6 * GIB
    assert f"lower OVIS_MAX_IMAGE_SIZE to {fits} or less" in str(refused.value)


def fit(copies: int, free_gib: float, offload: str = "auto") -> None:
    check_fit(
        device="cuda:0",
        copies=copies,
        free_bytes=int(free_gib * GIB),
        weights=WeightsSize(OVIS_WEIGHTS, OVIS_LARGEST),
        headroom_bytes=HEADROOM_1024,
        offload=offload,
        workers=copies,
        devices="cuda:0",
    )


def test_copies_fit_when_weights_plus_headroom_each_fit_the_free_memory() -> None:
    each_gib = (OVIS_WEIGHTS + HEADROOM_1024) / GIB  # about 20.6 GiB
    fit(3, free_gib=3 * each_gib + 0.1)
    with pytest.raises(SettingsError) as refused:
        fit(3, free_gib=3 * each_gib - 0.1)
    message = str(refused.value)
    assert "OVIS_WORKERS=3 with OVIS_DEVICES=cuda:0 puts 3 copies of the model on cuda:0" in message
    assert f"each needs about {each_gib:.1f} GiB" in message
    assert "Lower OVIS_WORKERS" in message


def test_one_copy_is_left_to_the_memory_mode() -> None:
    fit(1, free_gib=4)  # sequential offload fits a small card; no refusal here


def test_encoder_copies_keep_all_but_the_text_encoder_and_group_copies_only_headroom() -> None:
    text_encoder = int(1.72e9 * 2)
    weights = WeightsSize(OVIS_WEIGHTS, OVIS_LARGEST, text_encoder)
    each_gib = (OVIS_WEIGHTS - text_encoder + HEADROOM_1024) / GIB
    check_fit(
        device="cuda:0",
        copies=2,
        free_bytes=int((2 * each_gib + 0.1) * GIB),
        weights=weights,
        headroom_bytes=HEADROOM_1024,
        offload="encoder",
        workers=2,
        devices="cuda:0",
    )
    with pytest.raises(SettingsError, match="to give"):
        check_fit(
            device="cuda:0",
            copies=2,
            free_bytes=int((2 * each_gib - 0.1) * GIB),
            weights=weights,
            headroom_bytes=HEADROOM_1024,
            offload="encoder",
            workers=2,
            devices="cuda:0",
        )


def test_model_offload_copies_keep_only_the_largest_component_resident() -> None:
    each_gib = (OVIS_LARGEST + HEADROOM_1024) / GIB
    fit(2, free_gib=2 * each_gib + 0.1, offload="model")
    with pytest.raises(SettingsError):
        fit(2, free_gib=2 * each_gib + 0.1, offload="none")


def test_weights_are_read_from_safetensors_headers_in_the_requested_dtype(
    tmp_path: Path,
) -> None:
    for component, shape in (("transformer", (64, 32)), ("vae", (16, 8)), ("text_encoder", (8,))):
        (tmp_path / component).mkdir()
        tensors = {"w": torch.zeros(shape, dtype=torch.bfloat16)}
        save_file(tensors, tmp_path / component / "diffusion_pytorch_model.safetensors")
    size = estimate_weights(str(tmp_path), bytes_per_param=4)
    assert size == WeightsSize((64 * 32 + 16 * 8 + 8) * 4, 64 * 32 * 4, 8 * 4)
    assert estimate_weights(str(tmp_path / "missing"), 2) is None
    assert estimate_weights("AIDC-AI/Ovis-Image-7B", 2) == WeightsSize(
        (7_370_000_000 + 1_720_000_000 + 84_000_000) * 2, 7_370_000_000 * 2, 1_720_000_000 * 2
    )


def test_a_pipeline_is_measured_by_its_modules_and_kept_whole_on_the_cpu() -> None:
    pipe = build_tiny_pipeline().to(dtype=torch.bfloat16)

    def size(module: torch.nn.Module) -> int:
        tensors = [*module.parameters(), *module.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    sizes = component_sizes(pipe)
    assert sizes.transformer == size(pipe.transformer)
    assert sizes.text_encoder == size(pipe.text_encoder)
    assert sizes.vae == size(pipe.vae)
    # One double and one single block in the tiny transformer, in the order they run.
    blocks = [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]
    assert sizes.blocks == tuple(size(block) for block in blocks)
    placement = plan_placement(
        pipe, "sequential", torch.device("cpu"), budget_bytes=0, max_image_size=1024
    )
    assert placement.offload == "none"
    assert placement.budget_bytes == 0
    assert placement.weights == WeightsSize(
        sizes.total, max(sizes.transformer, sizes.text_encoder, sizes.vae), sizes.text_encoder
    )
