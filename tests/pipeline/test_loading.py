"""Loading the pipeline: each failure is one line naming its cause, the traceback at DEBUG."""

from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from structlog.testing import capture_logs

from ovis_service.model_source import ModelLoadError, preflight
from ovis_service.pipeline.loading import explain, explained_failures, load_pretrained
from ovis_service.pipeline.tiny import build_tiny_pipeline


def test_a_saved_pipeline_passes_and_loads(tmp_path: Path) -> None:
    build_tiny_pipeline().save_pretrained(tmp_path)
    preflight(str(tmp_path))
    pipe = load_pretrained(str(tmp_path), torch.float32)
    assert type(pipe).__name__ == "OvisImagePipeline"


def test_out_of_memory_while_loading_suggests_offload() -> None:
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore detail")
    assert explain(error, "AIDC-AI/Ovis-Image-7B") == (
        "out of memory while loading AIDC-AI/Ovis-Image-7B (CUDA out of memory. Tried to "
        "allocate 2.00 GiB.); free the GPU, or set OVIS_OFFLOAD=model (or sequential) to keep "
        "part of the weights in CPU memory"
    )


def _diffusers_style_failure() -> None:
    try:
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache")
    except LocalEntryNotFoundError as inner:
        raise OSError("Cannot load model owner/model: model is not cached locally") from inner


def test_a_wrapped_hub_error_is_found_under_the_wrapper() -> None:
    with pytest.raises(ModelLoadError) as error, explained_failures("owner/model"):
        _diffusers_style_failure()
    assert str(error.value).startswith("owner/model is not in the Hugging Face cache")
    # One line for the operator; the chain is cut so no traceback repeats it.
    assert error.value.__cause__ is None
    assert error.value.__suppress_context__


def test_an_unknown_failure_keeps_its_type_and_first_line() -> None:
    with capture_logs() as logs, pytest.raises(ModelLoadError) as error, explained_failures("m"):
        raise ValueError("bad shape for transformer.x\nsecond line")
    assert str(error.value) == "m: ValueError: bad shape for transformer.x"
    [debug] = [entry for entry in logs if entry["event"] == "model_load_traceback"]
    assert debug["log_level"] == "debug"
    assert debug["exc_info"] is True
