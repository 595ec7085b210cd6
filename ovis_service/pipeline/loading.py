"""Loading the pipeline, with what goes wrong told in one line.

`load_pretrained` and `explained_failures` turn a failure while loading (out of memory, a gated
repo, no hub and no cache, a broken model) into a `ModelLoadError` whose message is one line
naming the cause; the traceback goes to the log at DEBUG. What `OVIS_MODEL` names was already
checked, without torch, by `ovis_service.model_source.preflight`.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import structlog
import torch
from diffusers import OvisImagePipeline
from diffusers.utils import logging as diffusers_logging

from ovis_service.model_source import ModelLoadError, explain_hub_error

logger = structlog.get_logger(__name__)


def load_pretrained(model: str, dtype: torch.dtype) -> OvisImagePipeline:
    """`OvisImagePipeline.from_pretrained`, with its failures explained."""
    # Its per-component bar would interleave with the JSON log; the hub's download bars stay.
    diffusers_logging.disable_progress_bar()
    with explained_failures(model):
        return OvisImagePipeline.from_pretrained(model, dtype=dtype)


@contextmanager
def explained_failures(model: str) -> Iterator[None]:
    """Re-raise any exception as a one-line `ModelLoadError`; the traceback goes to DEBUG."""
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as exc:
        logger.debug("model_load_traceback", model=model, exc_info=True)
        raise ModelLoadError(explain(exc, model)) from None


def explain(error: BaseException, model: str) -> str:
    """One line naming the cause, from the outermost error in the chain that we recognise:
    diffusers wraps the hub's errors in its own."""
    for exc in _chain(error):
        if isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(exc):
            return (
                f"out of memory while loading {model} ({_first_line(exc)}); free the GPU, or "
                "set OVIS_OFFLOAD=model (or sequential) to keep part of the weights in CPU memory"
            )
        message = explain_hub_error(exc, model)
        if message is not None:
            return message
    return f"{model}: {type(error).__name__}: {_first_line(error)}"


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
