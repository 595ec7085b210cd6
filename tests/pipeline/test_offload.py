"""Memory plans on the tiny pipeline: the hooks that move weights, on the CPU (where a copy to the
CPU copies nothing, so what is checked is that they run when they should and change no pixel),
and on a GPU, where each plan must serve the resident plan's pixels within its budget."""

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from diffusers import OvisImagePipeline

from ovis_service.config import Settings
from ovis_service.engine import StepHooks
from ovis_service.pipeline import DiffusersEngine, budget
from ovis_service.pipeline.levers import compile_blocks
from ovis_service.pipeline.loop import generate
from ovis_service.pipeline.memory import GIB, Plan, transformer_blocks
from ovis_service.pipeline.offload import BlockStreamer, PinnedWeights, TakingTurns, place
from ovis_service.pipeline.tiny import build_tiny_pipeline
from ovis_service.schemas import GenerationParams

CPU = torch.device("cpu")
NO_HOOKS = StepHooks(stop_check=lambda: None)
PARAMS = GenerationParams(
    prompt="a lighthouse at dusk", num_inference_steps=2, width=256, height=256
)
# As tests/pipeline/test_compile.py: bf16 on CUDA, compiled kernels round differently.
CUDA_MEAN_TOLERANCE = 1.0


def pixels(pipe: OvisImagePipeline, params: GenerationParams = PARAMS) -> np.ndarray:
    with torch.inference_mode():
        image = generate(pipe, params, NO_HOOKS, cfg_batch=True)
    return np.asarray(image, dtype=np.int16)


class CountingWeights:
    """Counts a PinnedWeights' onloads."""

    def __init__(self, weights: PinnedWeights) -> None:
        self.onloads = 0
        original = weights.onload

        def counted() -> None:
            self.onloads += 1
            original()

        weights.onload = counted  # type: ignore[method-assign]


@pytest.fixture(scope="module")
def resident() -> np.ndarray:
    return pixels(build_tiny_pipeline())


def test_the_text_encoder_comes_in_once_per_request_and_leaves_before_denoising(
    resident: np.ndarray,
) -> None:
    pipe = build_tiny_pipeline()
    turns = TakingTurns(pipe, CPU, transformer_travels=False)
    assert list(turns.weights) == ["text_encoder"]
    counter = CountingWeights(turns.weights["text_encoder"])
    for request in (1, 2):
        # Guidance encodes the prompt and the negative prompt: two forwards, one copy.
        assert np.array_equal(pixels(pipe), resident)
        assert counter.onloads == request
        assert not turns.weights["text_encoder"].loaded


def test_under_model_offload_the_text_encoder_and_the_transformer_take_turns(
    resident: np.ndarray,
) -> None:
    pipe = build_tiny_pipeline()
    turns = TakingTurns(pipe, CPU, transformer_travels=True)
    counters = {name: CountingWeights(weights) for name, weights in turns.weights.items()}
    for request in (1, 2):
        assert np.array_equal(pixels(pipe), resident)
        # One trip each per request, however many forwards: the transformer stays until the
        # next prompt sends it out.
        assert {name: c.onloads for name, c in counters.items()} == {
            "text_encoder": request,
            "transformer": request,
        }
        assert turns.weights["transformer"].loaded
        assert not turns.weights["text_encoder"].loaded


def test_streamed_blocks_come_in_once_per_forward_and_the_next_forward_is_prefetched(
    resident: np.ndarray,
) -> None:
    pipe = build_tiny_pipeline()
    blocks = transformer_blocks(pipe)
    streamer = BlockStreamer(blocks, CPU)
    counters = [CountingWeights(weights) for weights in streamer._weights]
    assert np.array_equal(pixels(pipe), resident)
    # Two steps with guidance batched: two forwards; the last block also fetched the first one
    # for the forward after.
    assert [c.onloads for c in counters] == [3, 2]
    assert np.array_equal(pixels(pipe), resident)
    assert [c.onloads for c in counters] == [5, 4]


def test_one_streamed_block_is_fetched_by_its_own_forward() -> None:
    pipe = build_tiny_pipeline()
    blocks = transformer_blocks(pipe)
    streamer = BlockStreamer(blocks[1:], CPU)
    [counter] = [CountingWeights(weights) for weights in streamer._weights]
    pixels(pipe)
    assert counter.onloads == 2


@pytest.mark.parametrize(
    ("offload", "resident_blocks"),
    [("encoder", 0), ("group", 1), ("group", 0), ("model", 0), ("sequential", 0)],
)
def test_each_plan_serves_the_resident_pixels(
    offload: str, resident_blocks: int, resident: np.ndarray
) -> None:
    pipe = build_tiny_pipeline()
    place(pipe, Plan(offload, resident_blocks, 0, "test"), CPU)  # type: ignore[arg-type]
    assert np.array_equal(pixels(pipe), resident)
    assert np.array_equal(pixels(pipe), resident)


def test_regional_compile_leaves_streamed_blocks_alone() -> None:
    pipe = build_tiny_pipeline()
    place(pipe, Plan("group", 1, 0, "test"), CPU)
    double, single = transformer_blocks(pipe)
    # compile() only marks a module; nothing is compiled until it runs.
    assert compile_blocks(pipe.transformer) == 1
    assert double._compiled_call_impl is not None
    assert single._compiled_call_impl is None


# -- on a GPU ----------------------------------------------------------------------------------

BUDGET = "3GiB"  # above the headroom for OVIS_MAX_IMAGE_SIZE=512 (2.4 GiB); the tiny model is MBs
PLANS = ["none", "encoder", "group", "model", "sequential"]


@pytest.fixture
def cuda() -> Iterator[torch.device]:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    budget.forget()
    yield torch.device("cuda", 0)
    budget.forget()
    torch.cuda.empty_cache()


def served(offload: str, compile_: str) -> tuple[np.ndarray, DiffusersEngine]:
    settings = Settings(
        model="tiny",
        device="cuda",
        offload=offload,  # type: ignore[arg-type]
        compile=compile_,  # type: ignore[arg-type]
        gpu_memory=BUDGET,
        max_image_size=512,
    )
    engine = DiffusersEngine(settings)
    engine.load()
    image = engine.generate(PARAMS, NO_HOOKS).image
    return np.asarray(image, dtype=np.int16), engine


@pytest.mark.gpu
@pytest.mark.parametrize("offload", PLANS)
def test_on_a_gpu_each_plan_serves_the_resident_pixels_within_its_budget(
    offload: str, cuda: torch.device
) -> None:
    expected, engine = served("none", "none")
    engine.release()
    torch.cuda.reset_peak_memory_stats(cuda)
    got, engine = served(offload, "none")
    assert float(np.abs(got - expected).mean()) <= CUDA_MEAN_TOLERANCE
    assert torch.cuda.max_memory_reserved(cuda) <= 3 * GIB
    engine.release()


@pytest.mark.gpu
@pytest.mark.timeout(900)
@pytest.mark.parametrize("offload", ["none", "encoder", "group", "model"])
def test_on_a_gpu_compile_holds_with_each_plan_it_is_combined_with(
    offload: str, cuda: torch.device
) -> None:
    expected, engine = served("none", "none")
    engine.release()
    got, engine = served(offload, "regional")
    assert float(np.abs(got - expected).mean()) <= CUDA_MEAN_TOLERANCE
    engine.release()
