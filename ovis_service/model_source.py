"""What `OVIS_MODEL` names, checked before anything loads torch or looks for a GPU.

A typo in a path, a directory that holds no pipeline, a hub id that is neither reachable nor
cached: each ends startup in a couple of seconds with one line naming the cause, instead of
after the device check (which would blame the GPU) or minutes of loading. No torch here.
"""

import json
from pathlib import Path

import structlog
from huggingface_hub import constants as hub_constants
from huggingface_hub import get_token, hf_hub_download
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

logger = structlog.get_logger(__name__)

TINY_MODEL_ID = "tiny"  # the id `ovis_service.pipeline.tiny` builds in memory
MODEL_INDEX = "model_index.json"  # what makes a directory or a repo a diffusers pipeline
PIPELINE_CLASS = "OvisImagePipeline"
# About 0.3 s on a 2-core CPU; the defaults (1024x1024, 50 steps) take about 40 s there.
TINY_QUICK_REQUEST = '{"prompt": "a red fox", "image_size": 256, "num_inference_steps": 4}'


class ModelLoadError(RuntimeError):
    """The model cannot be loaded; the message is one line an operator can act on."""


def preflight(model: str) -> None:
    """Check that `model` names a loadable pipeline: raise `ModelLoadError` if it cannot be."""
    if model == TINY_MODEL_ID:
        logger.info(
            "tiny_model",
            note="random weights: images are noise, but every code path is real",
            quick_request=TINY_QUICK_REQUEST,
            defaults="1024x1024 at 50 steps takes about 40 s on a 2-core CPU",
        )
        return
    if _is_hub_id(model):
        _check_hub(model)
    else:
        check_directory(Path(model).expanduser())


def public_model_name(model: str) -> str:
    """What clients see of `OVIS_MODEL` (/health, /v1/models, image metadata): a hub id as it
    is, a local directory by its last component only, since a host path says too much."""
    if model == TINY_MODEL_ID or _is_hub_id(model):
        return model
    return Path(model).expanduser().name or model


def _is_hub_id(model: str) -> bool:
    """`owner/name`, as diffusers reads it when no such directory exists."""
    if Path(model).expanduser().exists():
        return False
    return model.count("/") == 1 and not model.startswith((".", "~", "/"))


def check_directory(path: Path) -> None:
    """A directory in `save_pretrained` layout holding an `OvisImagePipeline`."""
    where = f"OVIS_MODEL={path}"
    if not path.exists():
        raise ModelLoadError(f"{where}: no such directory")
    if not path.is_dir():
        raise ModelLoadError(f"{where}: is a file; point it at the pipeline's directory")
    index = path / MODEL_INDEX
    if not index.is_file():
        raise ModelLoadError(
            f"{where}: not a diffusers model (no {MODEL_INDEX}); give a directory written by "
            f"save_pretrained, or a hub id such as AIDC-AI/Ovis-Image-7B"
        )
    _check_index(index, where)


def _check_index(index: Path, where: str) -> None:
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        raise ModelLoadError(f"{where}: {MODEL_INDEX} is not a readable JSON object") from None
    if class_name != PIPELINE_CLASS:
        raise ModelLoadError(f"{where}: holds a {class_name}, not an {PIPELINE_CLASS}")


def _check_hub(repo_id: str) -> None:
    """Fetch only `model_index.json` (from the cache when offline), so that a missing repo, a
    gated one or no network shows up now rather than after minutes of downloading."""
    try:
        index = hf_hub_download(repo_id, MODEL_INDEX)
    except Exception as exc:
        logger.debug("model_preflight_traceback", exc_info=True)
        message = explain_hub_error(exc, repo_id)
        raise ModelLoadError(message or f"{repo_id}: {type(exc).__name__}: {exc}") from None
    _check_index(Path(index), f"OVIS_MODEL={repo_id}")


def explain_hub_error(exc: BaseException, model: str) -> str | None:
    """One line for an error of the Hugging Face hub library; None for any other error."""
    if isinstance(exc, GatedRepoError):
        return _gated(model)
    if isinstance(exc, RepositoryNotFoundError):
        token_hint = "" if _has_token() else " (or it is private: set HF_TOKEN)"
        return f"OVIS_MODEL={model}: no such repository on the Hugging Face hub{token_hint}"
    if isinstance(exc, RevisionNotFoundError):
        return f"{model}: the requested revision does not exist on the hub"
    if isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        reason = "HF_HUB_OFFLINE=1" if hub_constants.HF_HUB_OFFLINE else "the hub is unreachable"
        return (
            f"{model} is not in the Hugging Face cache ({hub_constants.HF_HUB_CACHE}) and "
            f"cannot be downloaded ({reason}); download it once with network access, or set "
            "OVIS_MODEL to a local directory"
        )
    return None


def _gated(model: str) -> str:
    terms = f"accept its terms on https://huggingface.co/{model}"
    if _has_token():
        return (
            f"{model} is a gated repository the token given cannot read: {terms} with its account"
        )
    return f"{model} is a gated repository: {terms} and set HF_TOKEN to a token of that account"


def _has_token() -> bool:
    """HF_TOKEN, or a token saved by `hf auth login`."""
    return get_token() is not None
