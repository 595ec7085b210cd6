"""What OVIS_MODEL names, checked before torch loads: each refusal is one line naming its cause."""

import json
from pathlib import Path

import httpx
import pytest
from huggingface_hub.errors import GatedRepoError
from structlog.testing import capture_logs

from ovis_service.model_source import (
    ModelLoadError,
    explain_hub_error,
    preflight,
    public_model_name,
)


def refusal(model: str) -> str:
    with pytest.raises(ModelLoadError) as error:
        preflight(model)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_missing_directory_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    assert refusal(str(missing)) == f"OVIS_MODEL={missing}: no such directory"


def test_a_directory_without_a_pipeline_is_not_a_diffusers_model(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    assert refusal(str(tmp_path)).startswith(
        f"OVIS_MODEL={tmp_path}: not a diffusers model (no model_index.json)"
    )


def test_a_file_is_not_a_model_directory(tmp_path: Path) -> None:
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"\0")
    assert (
        refusal(str(file)) == f"OVIS_MODEL={file}: is a file; point it at the pipeline's directory"
    )


def test_another_pipeline_class_is_named(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    assert (
        refusal(str(tmp_path))
        == f"OVIS_MODEL={tmp_path}: holds a FluxPipeline, not an OvisImagePipeline"
    )


def test_a_broken_model_index_is_named(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text("{not json")
    assert refusal(str(tmp_path)).endswith("model_index.json is not a readable JSON object")


def test_a_hub_id_that_is_not_cached_offline_says_so() -> None:
    # conftest sets HF_HUB_OFFLINE=1, as on a machine without the hub.
    message = refusal("no-such-owner/no-such-model")
    assert message.startswith("no-such-owner/no-such-model is not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE=1" in message


def test_the_tiny_model_says_once_what_it_is_and_which_request_is_quick() -> None:
    with capture_logs() as logs:
        preflight("tiny")
    [notice] = [entry for entry in logs if entry["event"] == "tiny_model"]
    assert "noise" in notice["note"]
    assert json.loads(notice["quick_request"])["image_size"] == 256


def _hub_response(status: int) -> httpx.Response:
    url = "https://huggingface.co/owner/gated/resolve/main/model_index.json"
    return httpx.Response(status, request=httpx.Request("HEAD", url))


def test_a_gated_repo_without_a_token_asks_for_hf_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ovis_service.model_source.get_token", lambda: None)
    error = GatedRepoError("401 Client Error", response=_hub_response(401))
    assert explain_hub_error(error, "owner/gated") == (
        "owner/gated is a gated repository: accept its terms on "
        "https://huggingface.co/owner/gated and set HF_TOKEN to a token of that account"
    )


@pytest.mark.parametrize(
    ("model", "shown"),
    [
        ("AIDC-AI/Ovis-Image-7B", "AIDC-AI/Ovis-Image-7B"),
        ("tiny", "tiny"),
        ("/srv/models/ovis-image-7b", "ovis-image-7b"),
        ("./weights/ovis", "ovis"),
        ("~/models/ovis/", "ovis"),
    ],
)
def test_clients_see_a_hub_id_whole_and_a_local_path_by_its_last_part(
    model: str, shown: str
) -> None:
    assert public_model_name(model) == shown
