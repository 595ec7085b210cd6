"""The `auto` memory mode on fake VRAM figures, sized like Ovis-Image-7B in bf16."""

import pytest

from ovis_service.pipeline.memory import GIB, activation_headroom, choose_offload

# Transformer 7.37 B params + Qwen3 1.72 B + VAE, in bf16 (two bytes per parameter).
OVIS_WEIGHTS = int((7.37e9 + 1.72e9 + 0.08e9) * 2)
OVIS_LARGEST = int(7.37e9 * 2)
HEADROOM_1024 = activation_headroom(1024)
HEADROOM_DEFAULT = activation_headroom(2048)  # OVIS_MAX_IMAGE_SIZE defaults to 2048


def auto(free_gib: float, headroom: int = HEADROOM_DEFAULT) -> str:
    return choose_offload(
        "auto",
        on_cuda=True,
        free_bytes=int(free_gib * GIB),
        weights_bytes=OVIS_WEIGHTS,
        largest_component_bytes=OVIS_LARGEST,
        headroom_bytes=headroom,
    )


@pytest.mark.parametrize(
    ("card", "free_gib", "expected"),
    [
        ("H100 80 GB", 78.5, "none"),
        ("A100 40 GB", 39.0, "none"),
        ("RTX 4090 24 GB", 22.8, "model"),
        ("RTX 4080 16 GB", 15.2, "sequential"),
        ("RTX 3060 12 GB", 11.4, "sequential"),
    ],
)
def test_auto_picks_by_free_vram(card: str, free_gib: float, expected: str) -> None:
    assert auto(free_gib) == expected, card


def test_larger_images_need_more_headroom() -> None:
    assert activation_headroom(2048) > activation_headroom(1024) > activation_headroom(512)
    # A 24 GB card keeps everything resident when requests stop at 1024x1024 ...
    assert auto(22.8, headroom=HEADROOM_1024) == "none"
    # ... but needs model offload when they may reach 2048x2048.
    assert auto(22.8, headroom=HEADROOM_DEFAULT) == "model"


def test_an_explicit_mode_wins_over_the_measurement() -> None:
    for mode in ("none", "model", "sequential"):
        assert (
            choose_offload(
                mode,
                on_cuda=True,
                free_bytes=0,
                weights_bytes=OVIS_WEIGHTS,
                largest_component_bytes=OVIS_LARGEST,
                headroom_bytes=HEADROOM_1024,
            )
            == mode
        )


def test_the_cpu_never_offloads() -> None:
    assert (
        choose_offload(
            "sequential",
            on_cuda=False,
            free_bytes=0,
            weights_bytes=OVIS_WEIGHTS,
            largest_component_bytes=OVIS_LARGEST,
            headroom_bytes=HEADROOM_1024,
        )
        == "none"
    )
