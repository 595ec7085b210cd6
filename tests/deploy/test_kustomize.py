"""Every built-in kind in the rendered manifests passes kubernetes-validate's strict schemas."""

import pytest
from kubernetes_validate import utils as kv

from tests.deploy.conftest import Manifest

BUILT_IN = {"Deployment", "Service", "PersistentVolumeClaim", "PodDisruptionBudget"}
CUSTOM = {"ScaledObject", "ServiceMonitor"}
# The oldest Kubernetes the manifests target (preStop uses `exec: sleep`, not 1.29's `sleep:`)
# and the newest kubernetes-validate bundles.
VERSIONS = ["1.25", kv.latest_version()]


def test_renders_the_expected_kinds(rendered: list[Manifest]) -> None:
    assert sorted(m["kind"] for m in rendered) == sorted(BUILT_IN | CUSTOM)


@pytest.mark.parametrize("version", VERSIONS)
def test_built_in_kinds_pass_strict_validation(rendered: list[Manifest], version: str) -> None:
    for manifest in rendered:
        name = f"{manifest['kind']}/{manifest['metadata']['name']}"
        if manifest["kind"] in CUSTOM:
            # kubernetes-validate has no schema for CRDs; test_custom_resources.py checks them.
            with pytest.raises(kv.SchemaNotFoundError):
                kv.validate(manifest, version, strict=True)
            continue
        # A built-in kind without a schema (a typo in apiVersion, say) raises here and fails.
        try:
            kv.validate(manifest, version, strict=True)
        except kv.SchemaNotFoundError as exc:
            pytest.fail(f"{name}: {exc.message}")
        except kv.ValidationError as exc:
            pytest.fail(f"{name} (Kubernetes {version}): {exc.message} at {list(exc.path)}")


def test_strict_validation_catches_an_unknown_field(base: list[Manifest]) -> None:
    """The check has teeth: a misspelt field in the pod spec is refused."""
    deployment = next(m for m in base if m["kind"] == "Deployment")
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, VERSIONS[-1], strict=True)
