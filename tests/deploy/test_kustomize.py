"""Every built-in kind in the rendered manifests passes kubernetes-validate's strict schemas."""

from collections import Counter

import pytest
from kubernetes_validate import utils as kv

from tests.deploy.conftest import Manifest

BUILT_IN = {"Deployment", "Service", "PersistentVolumeClaim", "PodDisruptionBudget"}
CUSTOM = {"ScaledObject", "ServiceMonitor"}
# The base has the model cache's claim and the SQLite job store's; the overlay keeps its jobs
# in PostgreSQL and drops the second.
CLAIMS = {
    "base": ["ovis-service-data", "ovis-service-hf-cache"],
    "overlay": ["ovis-service-hf-cache"],
}
# The oldest Kubernetes the manifests target (preStop uses `exec: sleep`, not 1.29's `sleep:`)
# and the newest kubernetes-validate bundles.
VERSIONS = ["1.25", kv.latest_version()]


@pytest.mark.parametrize("fixture", list(CLAIMS))
def test_renders_the_expected_kinds(request: pytest.FixtureRequest, fixture: str) -> None:
    manifests: list[Manifest] = request.getfixturevalue(fixture)
    expected = dict.fromkeys(BUILT_IN | CUSTOM, 1) | {"PersistentVolumeClaim": len(CLAIMS[fixture])}
    assert Counter(m["kind"] for m in manifests) == expected
    claims = [m for m in manifests if m["kind"] == "PersistentVolumeClaim"]
    assert sorted(m["metadata"]["name"] for m in claims) == CLAIMS[fixture]


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
