"""The kustomize base and the example overlay, rendered once per test session by kubectl."""

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
BASE = KUBERNETES / "base"
OVERLAY = KUBERNETES / "overlays" / "example"
SCHEMAS = KUBERNETES / "schemas"

Manifest = dict[str, Any]


def render(directory: Path) -> list[Manifest]:
    """`kubectl kustomize DIR`, parsed. kubectl is part of these machines; its absence is a
    broken setup, so the test fails instead of skipping."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl (with its built-in kustomize) is not on PATH: deploy/ cannot render")
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def only(manifests: list[Manifest], kind: str) -> Manifest:
    """The one manifest of `kind`."""
    found = [m for m in manifests if m["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="session")
def base() -> list[Manifest]:
    return render(BASE)


@pytest.fixture(scope="session")
def overlay() -> list[Manifest]:
    return render(OVERLAY)


@pytest.fixture(scope="session", params=["base", "overlay"])
def rendered(request: pytest.FixtureRequest) -> list[Manifest]:
    """Each rendering in turn, for checks that must hold for both."""
    manifests: list[Manifest] = request.getfixturevalue(request.param)
    return manifests
