"""The DbtBackfill CRD, checked without a cluster.

* the CRD object itself against the apiextensions.k8s.io/v1 schema (kubernetes-validate);
* sample and invalid manifests against its openAPIV3Schema (jsonschema), mimicking the API
  server: unknown fields rejected (kubectl's default strict field validation), defaults applied
  before the CEL rules run;
* every ``x-kubernetes-validations`` rule, found by walking the schema, with cel-python. Values
  are typed as the API server types them for CEL: ``format: date``/``date-time`` strings are
  timestamps, not strings (k8s.io/apiserver/pkg/cel/common/schemas.go and values.go);
* that every field is described, for ``kubectl explain``, and the printer columns.

Invalid manifests live in tests/unit/crd_invalid/; each names the layer that must reject it
(``schema`` or ``cel``) and the field it is about. test_spec.py runs them through parse_spec.
"""

from __future__ import annotations

import copy
import datetime as dt
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml
from celpy import celtypes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.crd_schema import openapi_to_jsonschema

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "dbtbackfills.dbt-backfill.io.yaml"
SAMPLES = sorted((ROOT / "crds" / "samples").glob("*.yaml"))
INVALID_DIR = Path(__file__).resolve().parent / "crd_invalid"
LAYER = "test.dbt-backfill.io/layer"
FIELD = "test.dbt-backfill.io/field"

# kubernetes-validate ships schemas for these minors; fieldPath on validation rules needs 1.28.
MIN_KUBERNETES_MINOR = 28


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


CRD: dict[str, Any] = load_yaml(CRD_PATH)
VERSION: dict[str, Any] = CRD["spec"]["versions"][0]
SCHEMA: dict[str, Any] = VERSION["schema"]["openAPIV3Schema"]


def invalid_manifests() -> list[Any]:
    return [
        pytest.param(doc, id=doc["metadata"]["name"])
        for path in sorted(INVALID_DIR.glob("*.yaml"))
        for doc in load_all(path)
    ]


# --- schema walking ------------------------------------------------------------------------


def walk(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with a dotted path: properties by name, items as [], maps as {}."""
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}" if path else name)
    if isinstance(schema.get("items"), dict):
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting as the API server does it: top-down, so that a defaulted ``{}``
    gets its own fields' defaults too."""
    value = copy.deepcopy(value)
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(sub, value[name])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            value = {k: apply_defaults(extra, v) for k, v in value.items()}
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        value = [apply_defaults(schema["items"], v) for v in value]
    return value


# --- jsonschema ----------------------------------------------------------------------------


FORMAT_CHECKER = jsonschema.FormatChecker()


@FORMAT_CHECKER.checks("date-time", raises=ValueError)
def _is_date_time(instance: object) -> bool:
    # jsonschema checks date-time only with an optional package; RFC 3339 is simple enough.
    if not isinstance(instance, str):
        return True
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})", instance):
        return False
    dt.datetime.fromisoformat(instance.upper().replace("Z", "+00:00"))
    return True


VALIDATOR = jsonschema.Draft202012Validator(openapi_to_jsonschema(SCHEMA, resource=True), format_checker=FORMAT_CHECKER)


def field_of(path: Any) -> str:
    """``['spec', 'models', 1]`` -> ``spec.models`` (list indices dropped)."""
    return ".".join(str(p) for p in path if not isinstance(p, int))


def schema_errors(obj: Any) -> list[tuple[str, str]]:
    """(field, message) for every violation; a missing or unknown field is reported at itself."""
    found = []
    for error in VALIDATOR.iter_errors(obj):
        where = field_of(error.absolute_path)
        if error.validator == "required":
            missing = [name for name in error.validator_value if name not in error.instance]
            where = ".".join(filter(None, [where, *missing[:1]]))
        elif error.validator == "additionalProperties":
            unknown = [name for name in error.instance if name not in error.schema.get("properties", {})]
            where = ".".join(filter(None, [where, *unknown[:1]]))
        found.append((where, error.message))
    return found


# --- CEL -----------------------------------------------------------------------------------

CEL_ENV = celpy.Environment()
_OLD_SELF = re.compile(r"\boldSelf\b")


def is_transition_rule(rule: dict[str, Any]) -> bool:
    return bool(_OLD_SELF.search(rule["rule"]))


def to_cel(schema: dict[str, Any], value: Any) -> Any:
    """A JSON value as the API server hands it to CEL, typed by its schema."""
    if schema.get("x-kubernetes-int-or-string"):
        return celpy.json_to_cel(value)
    kind = schema.get("type")
    if kind == "object":
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            return celtypes.MapType({celtypes.StringType(k): to_cel(extra, v) for k, v in value.items()})
        props = schema.get("properties", {})
        return celtypes.MapType({celtypes.StringType(k): to_cel(props[k], v) for k, v in value.items() if k in props})
    if kind == "array":
        return celtypes.ListType([to_cel(schema["items"], v) for v in value])
    if kind == "string" and schema.get("format") == "date":
        day = dt.date.fromisoformat(value)
        return celtypes.TimestampType(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC))
    if kind == "string" and schema.get("format") == "date-time":
        return celtypes.TimestampType(value)
    if kind == "number":
        return celtypes.DoubleType(value)
    return celpy.json_to_cel(value)


def run_cel(expression: str, activation: dict[str, Any]) -> Any:
    program = CEL_ENV.program(CEL_ENV.compile(expression))
    result = program.evaluate(activation)
    if isinstance(result, celpy.CELEvalError):
        raise result
    return result


def cel_failures(
    schema: dict[str, Any], new: Any, old: Any = None, path: str = "", *, force_messages: bool = False
) -> list[tuple[str, str]]:
    """(field, message) for every rule that fails on ``new`` (with ``old`` for transition rules).

    Evaluation errors are failures too, as on the API server. With ``force_messages`` every
    messageExpression is evaluated even when its rule holds, so that it is tested as well.
    """
    failures: list[tuple[str, str]] = []
    if new is None:
        return failures
    for rule in schema.get("x-kubernetes-validations", []):
        if is_transition_rule(rule) and old is None:
            continue
        activation = {"self": to_cel(schema, new)}
        if old is not None:
            activation["oldSelf"] = to_cel(schema, old)
        where = path + rule.get("fieldPath", "")
        try:
            result = run_cel(rule["rule"], activation)
        except Exception as exc:  # any evaluation error fails the rule
            failures.append((where, f"error evaluating {rule['rule']!r}: {exc}"))
            continue
        if not isinstance(result, celtypes.BoolType):
            failures.append((where, f"rule {rule['rule']!r} returned {type(result).__name__}"))
            continue
        if result and not force_messages:
            continue
        if "messageExpression" in rule:
            try:
                message = run_cel(rule["messageExpression"], activation)
            except Exception as exc:  # reported like a failing rule
                failures.append((where, f"error evaluating {rule['messageExpression']!r}: {exc}"))
                continue
            if not isinstance(message, str):
                failures.append((where, f"messageExpression returned {type(message).__name__}"))
                continue
        else:
            message = rule.get("message", f"failed rule: {rule['rule']}")
        if not result:
            failures.append((where, str(message)))
    if isinstance(new, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in new:
                old_value = old.get(name) if isinstance(old, dict) else None
                failures += cel_failures(
                    sub,
                    new[name],
                    old_value,
                    f"{path}.{name}" if path else name,
                    force_messages=force_messages,
                )
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name, value in new.items():
                old_value = old.get(name) if isinstance(old, dict) else None
                failures += cel_failures(extra, value, old_value, f"{path}.{name}", force_messages=force_messages)
    elif isinstance(new, list) and isinstance(schema.get("items"), dict):
        # Transition rules inside lists need a correlatable (map) list; ours have none there.
        for value in new:
            failures += cel_failures(schema["items"], value, None, path, force_messages=force_messages)
    return failures


def admit(new: dict[str, Any], old: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """What the API server would say to a create (``old`` None) or an update: schema errors,
    then, if the schema holds, CEL rule failures on the defaulted object."""
    errors = schema_errors(new)
    if errors:
        return errors
    new = apply_defaults(SCHEMA, new)
    old = apply_defaults(SCHEMA, old) if old is not None else None
    return cel_failures(SCHEMA, new, old)


def manifest(**spec: Any) -> dict[str, Any]:
    base = {"startDate": "2024-01-01", "endDate": "2024-01-31", "databaseSecretRef": {"name": "db"}}
    return {
        "apiVersion": "dbt-backfill.io/v1alpha1",
        "kind": "DbtBackfill",
        "metadata": {"name": "t"},
        "spec": {**base, **spec},
    }


def with_spec(obj: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A copy of ``obj`` with spec fields changed; a value of None removes the field."""
    obj = copy.deepcopy(obj)
    for key, value in changes.items():
        if value is None:
            obj["spec"].pop(key, None)
        else:
            obj["spec"][key] = value
    return obj


ALL_RULES = [
    pytest.param(path, rule, id=f"{path}:{rule['rule'][:40]}")
    for path, node in walk(SCHEMA)
    for rule in node.get("x-kubernetes-validations", [])
]


# --- the CRD object ------------------------------------------------------------------------


def kubernetes_versions() -> list[str]:
    versions = sorted(
        {v for v in kubernetes_validate.utils.all_versions() if int(v.split(".")[1]) >= MIN_KUBERNETES_MINOR},
        key=lambda v: tuple(int(p) for p in v.split(".")),
    )
    assert versions, "kubernetes-validate ships no schema for a supported Kubernetes version"
    return versions


@pytest.mark.parametrize("version", kubernetes_versions())
def test_crd_is_a_valid_custom_resource_definition(version: str) -> None:
    kubernetes_validate.validate(CRD, version, strict=True)


def test_crd_names_and_version() -> None:
    spec = CRD["spec"]
    assert CRD["metadata"]["name"] == "dbtbackfills.dbt-backfill.io"
    assert spec["group"] == "dbt-backfill.io"
    assert spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": "DbtBackfill",
        "listKind": "DbtBackfillList",
        "plural": "dbtbackfills",
        "singular": "dbtbackfill",
        "shortNames": ["dbf"],
        "categories": ["dbt"],
    }
    assert [(v["name"], v["served"], v["storage"]) for v in spec["versions"]] == [("v1alpha1", True, True)]
    assert VERSION["subresources"] == {"status": {}}


def test_schema_is_structural_enough() -> None:
    """The API server's structural rules we can check offline: a type on every node (unless
    int-or-string), no properties next to additionalProperties, root metadata bare, and no
    preserve-unknown-fields anywhere (spec and status are fully schemed)."""
    assert SCHEMA["properties"]["metadata"] == {"type": "object"}
    for path, node in walk(SCHEMA):
        if not node.get("x-kubernetes-int-or-string"):
            assert node.get("type") in {"object", "array", "string", "integer", "number", "boolean"}, path
        assert not ("properties" in node and "additionalProperties" in node), path
        assert "x-kubernetes-preserve-unknown-fields" not in node, path
        if node.get("type") == "array":
            assert isinstance(node.get("items"), dict), path
        if node.get("x-kubernetes-list-type") == "map":
            assert set(node["x-kubernetes-list-map-keys"]) <= set(node["items"].get("required", [])), path


def test_every_field_has_a_description() -> None:
    undocumented = [
        path or "<root>"
        for path, node in walk(SCHEMA)
        if path != "metadata" and not str(node.get("description", "")).strip()
    ]
    assert undocumented == []


DEFAULTED = [pytest.param(path, node, id=path) for path, node in walk(SCHEMA) if "default" in node]


@pytest.mark.parametrize(("path", "node"), DEFAULTED)
def test_defaults_are_valid_for_their_fields_as_written(path: str, node: dict[str, Any]) -> None:
    """At CRD creation the API server validates each ``default`` exactly as written, with
    the defaults of the fields inside it NOT applied
    (apiextensions-apiserver/pkg/apiserver/schema/defaulting/validation.go)."""
    sub = jsonschema.Draft202012Validator(openapi_to_jsonschema(node), format_checker=FORMAT_CHECKER)
    assert [e.message for e in sub.iter_errors(node["default"])] == []


def test_there_are_defaults_with_rules() -> None:
    """The check below must have something to check: spec.retry has a default and a rule."""
    with_rules = {
        path
        for path, node in (p.values for p in DEFAULTED)
        if any(sub.get("x-kubernetes-validations") for _, sub in walk(node))
    }
    assert "spec.retry" in with_rules


@pytest.mark.parametrize(("path", "node"), DEFAULTED)
def test_object_defaults_agree_with_their_fields_defaults(path: str, node: dict[str, Any]) -> None:
    """An object's default is spelled out (see the next test), so it must say what its fields'
    own defaults say: whether ``retry`` is omitted or given as ``{}``, the result is the same."""
    if node.get("type") != "object" or "properties" not in node:
        return
    assert node["default"] == apply_defaults(node, {})


@pytest.mark.parametrize(("path", "node"), DEFAULTED)
def test_cel_rules_hold_on_defaults_as_written(path: str, node: dict[str, Any]) -> None:
    """The same check for CEL: validation.go runs the rules of the defaulted node and of every
    node below it on the default as written (no nested defaulting), with ``oldSelf`` set to
    the default too, and, with CRDValidationRatcheting (on by default), once more as a create.
    A rule that reads a field the default omits fails with "no such key" and the API server
    refuses the whole CRD."""
    default = copy.deepcopy(node["default"])
    assert cel_failures(node, default, copy.deepcopy(default), path, force_messages=True) == []
    assert cel_failures(node, default, None, path, force_messages=True) == []


def test_spec_fields_are_the_ones_the_operator_reads() -> None:
    from dbtbackfill.core.spec import SPEC_FIELDS

    spec = SCHEMA["properties"]["spec"]
    assert set(spec["properties"]) == SPEC_FIELDS
    assert set(spec["required"]) == {"startDate", "endDate", "databaseSecretRef"}


def test_status_fields() -> None:
    status = SCHEMA["properties"]["status"]["properties"]
    assert set(status) == {
        "observedGeneration",
        "phase",
        "progress",
        "chunks",
        "recordsProcessed",
        "startTime",
        "completionTime",
        "estimatedCompletionTime",
        "succeededRanges",
        "failedRanges",
        "tenants",  # a matrix backfill's tenant count, hash and tenantIdsFrom snapshot
        "tenantProgress",
        "costEstimate",  # spec.dryRun's ETA from past chunks of the same models
        "recentFailures",
        "chunkState",
        "auditExecutionId",
        "audit",
        "retryFailedObserved",
        "queuedBehind",
        "queue",  # the backfill's share of its DbtBackfillQueue
        "apiFailures",  # kept by the API server, not pruned: the backoff after failed calls
        "apiRetryAt",
        "conditions",
    }
    assert status["phase"]["enum"] == [
        "Pending",
        "Queued",
        "Running",
        "Succeeded",
        "Failed",
        "Suspended",
        "Cancelled",
    ]
    assert set(status["chunks"]["properties"]) == {"total", "succeeded", "failed", "running", "pending"}
    assert set(status["chunkState"]["properties"]) == {
        "succeeded",
        "failed",
        "attempts",
        "retryBase",
        "retryAt",
        "records",
        "durations",
    }
    assert status["recentFailures"]["maxItems"] == 10
    conditions = status["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert conditions["items"]["properties"]["status"]["enum"] == ["True", "False", "Unknown"]


def test_a_realistic_status_is_valid() -> None:
    obj = manifest()
    obj["status"] = {
        "observedGeneration": 3,
        "phase": "Running",
        "progress": "12/31",
        "chunks": {"total": 31, "succeeded": 11, "failed": 1, "running": 2, "pending": 17},
        "recordsProcessed": 123456789012,
        "startTime": "2024-02-01T10:00:00Z",
        "estimatedCompletionTime": "2024-02-01T12:30:00.5+00:00",
        "succeededRanges": ["2024-01-01..2024-01-11"],
        "failedRanges": ["2024-01-12..2024-01-12"],
        "recentFailures": [
            {
                "chunk": 11,
                "window": "2024-01-12..2024-01-12",
                "attempts": 3,
                "message": "dbt exited with 1",
                "time": "2024-02-01T11:00:00Z",
            }
        ],
        "chunkState": {
            "succeeded": [[0, 10]],
            "failed": [[11, 11]],
            "attempts": {"11": 3, "12": 1},
            "retryBase": {"11": 1},
            "retryAt": {"12": "2024-02-01T11:05:00Z"},
            "records": 1000,
            "durations": {"count": 12, "totalSeconds": 3600.5},
        },
        "auditExecutionId": "1b4e28ba-2fa1-11d2-883f-0016d3cca427",
        "audit": {"executionId": "1b4e28ba-2fa1-11d2-883f-0016d3cca427", "started": True, "closed": "failed"},
        "retryFailedObserved": "2024-02-01",
        "queuedBehind": "other-backfill",
        "conditions": [
            {
                "type": "Progressing",
                "status": "True",
                "reason": "ChunksRunning",
                "message": "2 chunks running",
                "lastTransitionTime": "2024-02-01T10:00:00Z",
                "observedGeneration": 3,
            }
        ],
    }
    assert admit(obj) == []


@pytest.mark.parametrize(
    "status",
    [
        {"phase": "Done"},
        {"unknownField": 1},
        {"recentFailures": [{"chunk": 1, "message": "x" * 1025}]},
        {"recentFailures": [{"chunk": i} for i in range(11)]},
        {"chunkState": {"succeeded": [[1, 2, 3]]}},
        {"chunkState": {"attempts": {"1": "two"}}},
        {"chunkState": {"records": -12}},
        {"chunkState": {"retryAt": {"1": "soon"}}},
        {"startTime": "yesterday"},
        {"auditExecutionId": "not-a-uuid"},
        {
            "conditions": [
                {
                    "type": "Ready",
                    "status": "Yes",
                    "reason": "R",
                    "message": "",
                    "lastTransitionTime": "2024-01-01T00:00:00Z",
                }
            ]
        },
        {"conditions": [{"type": "Ready", "status": "True"}]},
    ],
    ids=lambda s: next(iter(s)),
)
def test_invalid_status_is_rejected(status: dict[str, Any]) -> None:
    obj = manifest()
    obj["status"] = status
    assert schema_errors(obj) != []


def test_printer_columns() -> None:
    columns = {c["name"]: c for c in VERSION["additionalPrinterColumns"]}
    expected = {
        "Phase": (".status.phase", "string", 0),
        "Progress": (".status.progress", "string", 0),
        "Tenant": (".spec.tenantId", "string", 0),
        "Tenants": (".status.tenants.count", "integer", 1),
        "Start": (".spec.startDate", "string", 0),
        "End": (".spec.endDate", "string", 0),
        "Age": (".metadata.creationTimestamp", "date", 0),
        "Failed": (".status.chunks.failed", "integer", 1),
        "Records": (".status.recordsProcessed", "integer", 1),
    }
    assert {n: (c["jsonPath"], c["type"], c.get("priority", 0)) for n, c in columns.items()} == expected
    assert list(columns) == list(expected)
    for column in columns.values():
        assert column.get("description"), column["name"]
        # A column's path must exist in the schema (metadata is implicit).
        parts = column["jsonPath"].lstrip(".").split(".")
        if parts[0] != "metadata":
            node = SCHEMA
            for part in parts:
                node = node["properties"][part]


def test_kustomization_builds_the_crd() -> None:
    kustomization = load_yaml(ROOT / "crds" / "kustomization.yaml")
    queue_crd = ROOT / "crds" / "dbtbackfillqueues.dbt-backfill.io.yaml"
    assert kustomization["resources"] == [CRD_PATH.name, queue_crd.name]
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    built = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "crds")], capture_output=True, text=True, check=True, timeout=60
    )
    by_name = {d["metadata"]["name"]: d for d in yaml.safe_load_all(built.stdout)}
    assert by_name == {CRD["metadata"]["name"]: CRD, "dbtbackfillqueues.dbt-backfill.io": load_yaml(queue_crd)}


# --- manifests -----------------------------------------------------------------------------


def test_there_are_samples_and_invalid_cases() -> None:
    assert {p.name for p in SAMPLES} >= {"january-2024.yaml"}
    assert len(SAMPLES) >= 3
    assert len(invalid_manifests()) >= 20


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_sample_is_admitted(path: Path) -> None:
    obj = load_yaml(path)
    assert obj["apiVersion"] == "dbt-backfill.io/v1alpha1"
    assert obj["kind"] == "DbtBackfill"
    assert admit(obj) == []
    # A no-op update passes the transition rules too.
    assert admit(obj, old=obj) == []


@pytest.mark.parametrize("doc", invalid_manifests())
def test_invalid_manifest_is_rejected(doc: dict[str, Any]) -> None:
    annotations = doc["metadata"]["annotations"]
    layer, expected_field = annotations[LAYER], annotations[FIELD]
    errors = schema_errors(doc)
    if layer == "schema":
        assert errors, "the schema accepts it"
        found = errors
    else:
        assert layer == "cel"
        assert errors == [], "the schema already rejects it; mark it layer: schema"
        found = admit(doc)
        assert found, "the CEL rules accept it"
    fields = [where for where, _ in found]
    assert any(where.startswith(expected_field) for where in fields), found


# --- CEL rules -----------------------------------------------------------------------------


def test_every_rule_is_found() -> None:
    rules = {(path, rule["rule"]) for path, rule in (p.values for p in ALL_RULES)}
    assert len(rules) == len(ALL_RULES)
    assert {path for path, _ in rules} == {
        "spec",
        "spec.retry",
        "spec.tolerations[]",
        "spec.nodeSelector",
        "spec.resources.limits",
        "spec.resources.requests",
    }


@pytest.mark.parametrize(("path", "rule"), ALL_RULES)
def test_rule_is_well_formed(path: str, rule: dict[str, Any]) -> None:
    assert set(rule) <= {"rule", "message", "messageExpression", "fieldPath", "reason", "optionalOldSelf"}
    assert rule.get("message") or rule.get("messageExpression"), "say why, not just which rule"
    CEL_ENV.compile(rule["rule"])
    if "messageExpression" in rule:
        CEL_ENV.compile(rule["messageExpression"])
    if "fieldPath" in rule:
        node = dict(walk(SCHEMA))[path]
        assert rule["fieldPath"].lstrip(".") in node["properties"], rule["fieldPath"]
    if is_transition_rule(rule):
        assert "[]" not in path, "transition rules need a correlatable parent"


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_every_rule_and_message_evaluates_on_samples(path: Path) -> None:
    """Runs every rule and every messageExpression (even on success), so a type error in any
    of them -- e.g. string operations on a date, which CEL sees as a timestamp -- shows up."""
    obj = apply_defaults(SCHEMA, load_yaml(path))
    assert cel_failures(SCHEMA, obj, obj, force_messages=True) == []


def test_samples_reach_every_rule() -> None:
    """The sample-based test above only proves what the samples reach."""
    reached = set()
    for sample in SAMPLES:
        obj = apply_defaults(SCHEMA, load_yaml(sample))
        for path, node in walk(SCHEMA):
            value: Any = obj
            for part in path.replace("[]", ".[]").split(".") if path else []:
                if part == "[]":
                    value = value[0] if value else None
                elif isinstance(value, dict):
                    value = value.get(part)
                else:
                    value = None
            if value is not None and node.get("x-kubernetes-validations"):
                reached.add(path)
    assert reached == {path for path, _ in (p.values for p in ALL_RULES)}


def spec_failures(new: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    return [message for _, message in admit(new, old)]


def test_reversed_dates_fail() -> None:
    assert spec_failures(manifest(startDate="2024-02-01", endDate="2024-01-31")) == [
        "endDate must be on or after startDate"
    ]


def test_a_single_day_passes() -> None:
    assert spec_failures(manifest(startDate="2024-02-29", endDate="2024-02-29")) == []


def test_range_limit_is_3660_days_inclusive() -> None:
    start = dt.date(2020, 1, 1)
    at_limit = start + dt.timedelta(days=3659)
    assert spec_failures(manifest(startDate=start.isoformat(), endDate=at_limit.isoformat())) == []
    too_long = manifest(startDate=start.isoformat(), endDate=(at_limit + dt.timedelta(days=1)).isoformat())
    # A static message: the real API server refuses a messageExpression with string(int) as too
    # costly (kubernetes/kubernetes#124234), so the count is not in it.
    assert spec_failures(too_long) == [
        "the range spans more than 3660 days (3660 daily chunks); split it into several DbtBackfills"
    ]


def test_range_rule_matches_the_planner_limit() -> None:
    from dbtbackfill.core.planner import MAX_WINDOWS
    from dbtbackfill.core.spec import MAX_RANGE_DAYS

    rule = next(r["rule"] for r in SCHEMA["properties"]["spec"]["x-kubernetes-validations"] if "duration" in r["rule"])
    hours = int(re.search(r"duration\('(\d+)h'\)", rule).group(1))  # type: ignore[union-attr]
    assert hours == (MAX_RANGE_DAYS - 1) * 24
    assert MAX_RANGE_DAYS == MAX_WINDOWS


def test_retry_backoff_bounds_rule() -> None:
    assert spec_failures(manifest(retry={"backoffSeconds": 1000})) == [
        "maxBackoffSeconds must be at least backoffSeconds"
    ]
    assert spec_failures(manifest(retry={"backoffSeconds": 1000, "maxBackoffSeconds": 1000})) == []


@pytest.mark.parametrize(
    ("toleration", "ok"),
    [
        ({"key": "dedicated", "operator": "Equal", "value": "batch", "effect": "NoSchedule"}, True),
        ({"key": "dedicated", "value": "batch"}, True),
        ({"operator": "Exists"}, True),
        ({"key": "k", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 60}, True),
        ({"key": "k", "operator": "Exists", "value": "v"}, False),
        ({"value": "v"}, False),
        ({"key": "", "operator": "Equal"}, False),
        ({"key": "k", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 60}, False),
        ({"key": "k", "tolerationSeconds": 60}, False),
    ],
)
def test_toleration_rules(toleration: dict[str, Any], ok: bool) -> None:
    assert (spec_failures(manifest(tolerations=[toleration])) == []) is ok


# Transition rules: (change, allowed?)
UPDATES = [
    pytest.param({"suspend": True}, True, id="suspend"),
    pytest.param({"parallelism": 8}, True, id="parallelism"),
    pytest.param({"retryFailed": "2024-02-02T10:00"}, True, id="retryFailed"),
    pytest.param({"dryRun": True, "image": "ghcr.io/x/dbt:2"}, True, id="dryRun-and-image"),
    pytest.param({"startDate": "2024-01-02"}, False, id="startDate"),
    pytest.param({"endDate": "2024-01-30"}, False, id="endDate"),
    pytest.param({"tenantId": "globex"}, False, id="tenant-changed"),
    pytest.param({"tenantId": None}, False, id="tenant-removed"),
    pytest.param({"models": ["staging+"]}, False, id="models-changed"),
    pytest.param({"models": ["tag:nightly", "staging+"]}, False, id="models-reordered"),
    pytest.param({"models": None}, False, id="models-removed"),
]


@pytest.mark.parametrize(("change", "allowed"), UPDATES)
def test_updates(change: dict[str, Any], allowed: bool) -> None:
    old = load_yaml(ROOT / "crds" / "samples" / "tenant-acme-weekly.yaml")
    new = with_spec(old, **change)
    failures = admit(new, old)
    if allowed:
        assert failures == []
    else:
        assert len(failures) == 1
        assert "immutable" in failures[0][1]
        assert failures[0][0] == f"spec.{next(iter(change))}"


MATRIX_UPDATES = [
    pytest.param({"parallelism": 12, "suspend": True}, True, id="parallelism-and-suspend"),
    pytest.param({"tenantIds": ["acme", "globex", "hooli"]}, False, id="tenant-ids-changed"),
    pytest.param({"tenantIds": ["globex", "acme", "initech"]}, False, id="tenant-ids-reordered"),
    pytest.param({"tenantIds": None}, False, id="tenant-ids-removed"),
    pytest.param({"order": "tenantMajor"}, False, id="order-changed"),
]


@pytest.mark.parametrize(("change", "allowed"), MATRIX_UPDATES)
def test_matrix_updates(change: dict[str, Any], allowed: bool) -> None:
    """Cell numbers, Job names and audit ids follow the tenant list and the order."""
    old = load_yaml(ROOT / "crds" / "samples" / "tenants-matrix.yaml")
    failures = admit(with_spec(old, **change), old)
    if allowed:
        assert failures == []
    else:
        assert [where for where, _ in failures] == [f"spec.{next(iter(change))}"]
        assert "immutable" in failures[0][1]


def test_tenant_ids_from_is_immutable() -> None:
    old = with_spec(manifest(), tenantIdsFrom={"name": "tenants", "key": "ids"})
    assert admit(old, old) == []
    failures = admit(with_spec(old, tenantIdsFrom={"name": "tenants", "key": "other"}), old)
    assert [where for where, _ in failures] == ["spec.tenantIdsFrom"]


@pytest.mark.parametrize(
    "field",
    [
        pytest.param({"tenantId": "acme"}, id="tenant-added"),
        pytest.param({"models": ["a"]}, id="models-added"),
    ],
)
def test_optional_immutable_fields_cannot_be_added(field: dict[str, Any]) -> None:
    old = load_yaml(ROOT / "crds" / "samples" / "january-2024.yaml")
    failures = admit(with_spec(old, **field), old)
    assert [where for where, _ in failures] == [f"spec.{next(iter(field))}"]


def test_defaults_do_not_count_as_changes() -> None:
    """An old object stored before a default existed is defaulted on read, as on the server."""
    old = manifest()
    new = with_spec(old, chunk={"unit": "day", "size": 1}, parallelism=1, suspend=False)
    assert admit(new, old) == []


def test_cel_sees_dates_as_timestamps() -> None:
    """Guard the harness itself: were dates strings, string-only rules would pass here and
    then fail to compile on a real API server."""
    activation = {"self": to_cel(SCHEMA["properties"]["spec"], manifest()["spec"])}
    assert isinstance(run_cel("self.startDate", activation), celtypes.TimestampType)
    with pytest.raises(celpy.CELEvalError):
        run_cel("self.startDate + 'T00:00:00Z'", activation)


# --- the CRD and parse_spec agree ----------------------------------------------------------

_DATES = st.dates(dt.date(2000, 1, 1), dt.date(2030, 12, 31))

_SPEC_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "tenantId": st.sampled_from(["acme", "a" * 63, "a" * 64, "", "ac me", "-acme", "x_y-Z9", "acme.eu", 7]),
    "models": st.one_of(
        st.lists(st.sampled_from(["staging+", "tag:nightly", "@fact", "a b", "x'", "", "m" * 201]), max_size=3),
        st.just("staging+"),
    ),
    "chunk": st.fixed_dictionaries(
        {},
        optional={
            "unit": st.sampled_from(["day", "week", "month", "year", "Day"]),
            "size": st.sampled_from([-1, 0, 1, 7, 366, 367, "2"]),
        },
    ),
    "parallelism": st.sampled_from([0, 1, 32, 33, True, "2"]),
    "retry": st.fixed_dictionaries(
        {},
        optional={
            "limit": st.sampled_from([-1, 0, 20, 21]),
            "backoffSeconds": st.sampled_from([0, 1, 900, 901, 3600, 3601]),
            "maxBackoffSeconds": st.sampled_from([0, 1, 900, 86400, 86401]),
        },
    ),
    "activeDeadlineSeconds": st.sampled_from([0, 1, 3600]),
    "image": st.sampled_from(["ghcr.io/a/dbt:1", "", "a b", "i" * 513]),
    "databaseSecretRef": st.fixed_dictionaries(
        {},
        optional={
            "name": st.sampled_from(["db", "Db", "db.prod", "", "postgres://u:p@h/d"]),
            "key": st.sampled_from(["DATABASE_URL", "url.txt", "a/b", ""]),
        },
    ),
    "suspend": st.sampled_from([True, False, "yes"]),
    "dryRun": st.booleans(),
    "allowRecent": st.booleans(),
    "verify": st.booleans(),
    "allowFullRebuild": st.booleans(),
    "allowCrossWindow": st.booleans(),
    "ttlSecondsAfterFinished": st.sampled_from([-1, 0, 100, 2**31 - 1, 2**31]),
    "threads": st.sampled_from([0, 1, 64, 65]),
    "resources": st.fixed_dictionaries(
        {},
        optional={
            "limits": st.dictionaries(
                st.sampled_from(["cpu", "memory", "gpu", "example.com/gpu", "kubernetes.io/x", "hugepages-2Mi"]),
                st.sampled_from([1, -1, 0, "500m", "2Gi", "lots", "", "1e2.5", "-1", "1e3", "1e1234567890", ".5"]),
            ),
            "requests": st.dictionaries(
                st.sampled_from(["cpu", "requests.cpu", "a.b/c"]), st.sampled_from(["1.5", "+1e3", "1 Gi", "1E"])
            ),
        },
    ),
    "serviceAccountName": st.sampled_from(["runner", "Runner", "", "a.b-c"]),
    "nodeSelector": st.dictionaries(
        st.sampled_from(
            [
                "zone",
                "kubernetes.io/os",
                "-zone",
                "zone-",
                "a/b/c",
                "/zone",
                "Example.com/zone",
                "z" * 64,
                "d/" + "z" * 63,
            ]
        ),
        st.sampled_from(["", "a", "a b", "-a", 1]),
    ),
    "tolerations": st.lists(
        st.fixed_dictionaries(
            {},
            optional={
                "key": st.sampled_from(["", "dedicated"]),
                "operator": st.sampled_from(["Exists", "Equal", "In"]),
                "value": st.sampled_from(["", "batch"]),
                "effect": st.sampled_from(["NoSchedule", "NoExecute", "Never"]),
                "tolerationSeconds": st.sampled_from([0, 60]),
            },
        ),
        max_size=2,
    ),
    "retryFailed": st.sampled_from(["", "1", "x" * 63, "x" * 64]),
    "databaseUrl": st.just("postgres://u:p@h/d"),
}


@st.composite
def specs(draw: st.DrawFn) -> dict[str, Any]:
    start = draw(_DATES)
    end = start + dt.timedelta(days=draw(st.sampled_from([-1, 0, 1, 30, 400, 3659, 3660, 7000])))
    spec: dict[str, Any] = {"startDate": start.isoformat(), "endDate": end.isoformat()}
    if draw(st.integers(0, 9)):
        spec["databaseSecretRef"] = {"name": "db"}
    for name in draw(st.lists(st.sampled_from(sorted(_SPEC_FIELDS)), max_size=4, unique=True)):
        spec[name] = draw(_SPEC_FIELDS[name])
    if not draw(st.integers(0, 19)):
        spec.pop(draw(st.sampled_from(["startDate", "endDate"])))
    return spec


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs())
def test_parse_spec_agrees_with_the_crd(spec: dict[str, Any]) -> None:
    """Whatever the API server (schema + CEL) admits, parse_spec accepts, and the reverse."""
    from dbtbackfill.core.spec import SpecError, parse_spec

    failures = admit(manifest_from(spec))
    try:
        parse_spec(spec)
    except SpecError as exc:
        assert failures or is_pod_resource_rule(str(exc)), f"parse_spec refuses what the CRD admits: {exc}"
    else:
        assert failures == [], "parse_spec accepts what the CRD refuses"


def is_pod_resource_rule(message: str) -> bool:
    """The Pod API's rules that relate resource amounts to each other (a request within its
    limit, extended resources whole and not overcommitted, hugepages beside cpu or memory).
    The CRD leaves them to the operator, which refuses them as InvalidSpec before any Job."""
    return message.startswith(("spec.resources.requests.", "spec.resources:")) or "extended resource" in message


def manifest_from(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "dbt-backfill.io/v1alpha1",
        "kind": "DbtBackfill",
        "metadata": {"name": "t"},
        "spec": spec,
    }


@pytest.mark.parametrize(
    "changes",
    [
        {"nodeSelector": {"kubernetes.io/os": "linux", "topology.kubernetes.io/zone": "eu-1a", "pool": ""}},
        {"nodeSelector": {"a" * 253 + "/" + "b" * 63: "c"}},
        {"resources": {"limits": {"cpu": "+1", "memory": "1.5Gi", "example.com/gpu": 1, "hugepages-2Mi": "1Gi"}}},
        {"resources": {"requests": {"cpu": ".5", "memory": "1e9", "ephemeral-storage": "1E"}}},
        {"ttlSecondsAfterFinished": 2147483647},
    ],
    ids=["label-keys", "longest-key", "limits", "requests", "ttl-int32-max"],
)
def test_valid_pod_settings_are_admitted(changes: dict[str, Any]) -> None:
    from dbtbackfill.core.spec import parse_spec

    assert spec_failures(manifest(**changes)) == []
    parse_spec(manifest(**changes)["spec"])
