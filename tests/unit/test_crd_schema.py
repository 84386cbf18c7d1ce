"""The OpenAPI -> JSON Schema conversion the CRD and deploy tests validate with."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest

from tests.support.crd_schema import openapi_to_jsonschema

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "spec": {
            "type": "object",
            "properties": {
                "size": {"x-kubernetes-int-or-string": True},
                "note": {"type": "string", "nullable": True},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                "empty": {"type": "object"},
                "chunk": {"type": "object", "default": {"type": "object"}, "properties": {"unit": {"type": "string"}}},
            },
        }
    },
}


def errors(obj: dict[str, Any], *, resource: bool = True) -> list[str]:
    validator = jsonschema.Draft202012Validator(openapi_to_jsonschema(SCHEMA, resource=resource))
    return sorted(e.message for e in validator.iter_errors(obj))


def test_kubernetes_extensions_mean_what_the_api_server_means() -> None:
    spec = {"size": "10%", "note": None, "labels": {"a": "b"}, "extra": {"any": {"thing": 1}}, "empty": {}}
    assert errors({"apiVersion": "x/v1", "kind": "K", "metadata": {"name": "n", "labels": {}}, "spec": spec}) == []
    assert errors({"spec": {"size": 3}}) == []
    assert errors({"spec": {"size": 1.5}}) != []
    assert errors({"spec": {"labels": {"a": 1}}}) != []


@pytest.mark.parametrize("spec", [{"typo": 1}, {"empty": {"x": 1}}, {"chunk": {"unit": "day", "size": 2}}])
def test_unknown_fields_are_errors_not_pruned(spec: dict[str, Any]) -> None:
    assert any("Additional properties are not allowed" in m for m in errors({"spec": spec}))


def test_only_a_resource_root_takes_apiversion_kind_and_any_metadata() -> None:
    obj = {"apiVersion": "x/v1", "kind": "K", "metadata": {"name": "n"}}
    assert errors(obj) == []
    assert errors(obj, resource=False) != []


def test_values_are_copied_as_data() -> None:
    chunk = openapi_to_jsonschema(SCHEMA)["properties"]["spec"]["properties"]["chunk"]
    assert chunk["default"] == {"type": "object"}  # not given additionalProperties/properties
