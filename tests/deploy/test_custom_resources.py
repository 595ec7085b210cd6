"""The KEDA ScaledObject and the ServiceMonitor against their CRDs' schemas, vendored in
deploy/kubernetes/schemas (source and licence in its README)."""

import copy
import json
from typing import Any

import jsonschema
import pytest

from tests.deploy.conftest import SCHEMAS, Manifest, only

SCHEMA_FILES = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_scaledobject_v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitor_v1.json",
}


def validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / SCHEMA_FILES[(api_version, kind)]).read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def errors(manifest: Manifest) -> list[str]:
    found = validator(manifest["apiVersion"], manifest["kind"]).iter_errors(manifest)
    return [f"{'/'.join(map(str, e.path))}: {e.message}" for e in found]


@pytest.mark.parametrize("kind", ["ScaledObject", "ServiceMonitor"])
def test_custom_resource_matches_its_crd_schema(rendered: list[Manifest], kind: str) -> None:
    assert errors(only(rendered, kind)) == []


def test_scaled_object_min_not_above_max(rendered: list[Manifest]) -> None:
    """The CRD's one CEL rule, which JSON Schema cannot express."""
    spec = only(rendered, "ScaledObject")["spec"]
    assert spec["minReplicaCount"] <= spec.get("maxReplicaCount", 100)


def mutated(manifest: Manifest, change: Any) -> Manifest:
    copied = copy.deepcopy(manifest)
    change(copied)
    return copied


def test_trigger_metadata_values_must_be_strings(base: list[Manifest]) -> None:
    """A bare YAML number (`threshold: 3`) is what KEDA's API server refuses; so does the schema."""
    scaled = only(base, "ScaledObject")

    def unquote(m: Manifest) -> None:
        m["spec"]["triggers"][0]["metadata"]["threshold"] = 3

    assert any("threshold" in e for e in errors(mutated(scaled, unquote)))
    for key, value in scaled["spec"]["triggers"][0]["metadata"].items():
        assert isinstance(value, str), f"trigger metadata {key} is {type(value).__name__}"


def test_schemas_refuse_unknown_fields(base: list[Manifest]) -> None:
    """The vendored schemas are strict, as a structural CRD schema is: misspelt fields fail."""

    def misspell_min(m: Manifest) -> None:
        m["spec"]["minReplicas"] = m["spec"].pop("minReplicaCount")

    def misspell_path(m: Manifest) -> None:
        m["spec"]["endpoints"][0]["metricsPath"] = m["spec"]["endpoints"][0].pop("path")

    assert errors(mutated(only(base, "ScaledObject"), misspell_min))
    assert errors(mutated(only(base, "ServiceMonitor"), misspell_path))
