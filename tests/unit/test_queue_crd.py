"""The DbtBackfillQueue CRD, checked without a cluster (the e2e tests install it for real):
valid as a CRD, structural, documented, and in agreement with the operator's own parser."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from dbtbackfill.operator.queue_admission import MAX_RUNNING_CHUNKS, QUEUE_SPEC_FIELDS, QueueSpecError, parse_queue_spec
from tests.support.crd_schema import openapi_to_jsonschema

ROOT = Path(__file__).resolve().parents[2]
CRD = yaml.safe_load((ROOT / "crds" / "dbtbackfillqueues.dbt-backfill.io.yaml").read_text())
VERSION = CRD["spec"]["versions"][0]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]
VALIDATOR = jsonschema.Draft202012Validator(openapi_to_jsonschema(SCHEMA, resource=True))
WINDOW = SCHEMA["properties"]["spec"]["properties"]["allowedWindows"]["items"]
CEL = celpy.Environment()


def walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for name, sub in node.get("properties", {}).items():
        found += walk(sub, f"{path}.{name}".lstrip("."))
    if isinstance(node.get("items"), dict):
        found += walk(node["items"], f"{path}[]")
    return found


def admitted(spec: Any) -> bool:
    """What the API server says to a create: the schema, then the window rule (CEL)."""
    doc = {"apiVersion": "dbt-backfill.io/v1alpha1", "kind": "DbtBackfillQueue", "metadata": {}, "spec": spec}
    if any(True for _ in VALIDATOR.iter_errors(doc)):
        return False
    (rule,) = WINDOW["x-kubernetes-validations"]
    program = CEL.program(CEL.compile(rule["rule"]))
    return all(bool(program.evaluate({"self": celpy.json_to_cel(w)})) for w in spec.get("allowedWindows") or [])


def test_crd_is_valid_for_the_pinned_kubernetes() -> None:
    kubernetes_validate.validate(CRD, "1.34", strict=True)


def test_names_scope_columns_and_status() -> None:
    assert CRD["spec"]["scope"] == "Namespaced"  # a backfill joins the queue of its own namespace
    assert CRD["spec"]["names"]["kind"] == "DbtBackfillQueue"
    assert VERSION["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in VERSION["additionalPrinterColumns"]}
    assert columns == {
        "Running": ".status.running",
        "Waiting": ".status.waiting",
        "Max": ".spec.maxRunningChunks",
        "Paused": ".spec.paused",
        "Age": ".metadata.creationTimestamp",
    }
    status = SCHEMA["properties"]["status"]["properties"]
    assert {"observedGeneration", "conditions", "running", "waiting", "backfills"} <= set(status)
    assert set(SCHEMA["properties"]["spec"]["properties"]) == QUEUE_SPEC_FIELDS


def test_structural_and_documented() -> None:
    assert SCHEMA["properties"]["metadata"] == {"type": "object"}
    for path, node in walk(SCHEMA):
        assert node.get("type") in {"object", "array", "string", "integer", "boolean"}, path
        assert "x-kubernetes-preserve-unknown-fields" not in node, path
        if path != "metadata":
            assert str(node.get("description", "")).strip(), f"{path or '<root>'} has no description"


def test_the_example_is_admitted_and_parses() -> None:
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "examples" / "queue-warehouse.yaml").read_text()))
    (queue,) = [d for d in docs if d["kind"] == "DbtBackfillQueue"]
    assert admitted(queue["spec"])
    assert parse_queue_spec(queue["spec"]).max_running_chunks == 4


clocks = st.one_of(
    st.sampled_from(["00:00", "06:00", "20:00", "23:59", "24:00", "6:00", "12:60", "", "noon"]),
    st.builds(lambda h, m: f"{h:02d}:{m:02d}", st.integers(0, 25), st.integers(0, 61)),
)
windows = st.one_of(
    st.fixed_dictionaries({"start": clocks, "end": clocks}),
    st.fixed_dictionaries({"start": clocks}),
)
specs = st.fixed_dictionaries(
    {"maxRunningChunks": st.one_of(st.integers(-1, MAX_RUNNING_CHUNKS + 1), st.booleans(), st.just("2"))},
    optional={
        "allowedWindows": st.lists(windows, max_size=3),
        "paused": st.one_of(st.booleans(), st.just("yes")),
    },
)


@given(specs)
def test_the_parser_agrees_with_the_api_server(spec: dict[str, Any]) -> None:
    try:
        parse_queue_spec(spec)
        parsed = True
    except QueueSpecError:
        parsed = False
    assert parsed == admitted(spec), spec


@pytest.mark.parametrize("window", [{"start": "20:00", "end": "20:00"}, {"start": "20:00", "end": "24:00"}])
def test_windows_the_api_server_refuses(window: dict[str, str]) -> None:
    assert not admitted({"maxRunningChunks": 2, "allowedWindows": [window]})
