"""dbtbackfill.core.spec: parsing and re-validating a DbtBackfill spec."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from dbtbackfill.core.planner import Window
from dbtbackfill.core.spec import BackfillSpec, SpecError, overlaps, parse_spec

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "crds" / "samples"
INVALID_DIR = Path(__file__).resolve().parent / "crd_invalid"

MINIMAL = {"startDate": "2024-01-01", "endDate": "2024-01-31", "databaseSecretRef": {"name": "db"}}


def spec_of(**changes: Any) -> dict[str, Any]:
    """MINIMAL with changes; a change to None removes the field."""
    spec = {**MINIMAL, **changes}
    return {k: v for k, v in spec.items() if v is not None}


def sample_spec(name: str) -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load((SAMPLES / name).read_text())["spec"]
    return spec


def error_of(spec: Any) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(spec)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- samples -------------------------------------------------------------------------------


def test_minimal_spec_takes_the_crd_defaults() -> None:
    assert parse_spec(MINIMAL) == BackfillSpec(
        start_date=dt.date(2024, 1, 1),
        end_date=dt.date(2024, 1, 31),
        secret_name="db",
        secret_key="DATABASE_URL",
        tenant_id=None,
        models=(),
        chunk_unit="day",
        chunk_size=1,
        parallelism=1,
        retry_limit=2,
        backoff_seconds=30,
        max_backoff_seconds=900,
        active_deadline_seconds=None,
        image=None,
        suspend=False,
        dry_run=False,
        allow_recent=False,
        verify=False,
        allow_full_rebuild=False,
        allow_cross_window=False,
        ttl_seconds_after_finished=None,
        threads=None,
        resources=None,
        service_account_name=None,
        node_selector={},
        tolerations=(),
        retry_failed=None,
    )


def test_crd_defaults_match_the_dataclass_defaults() -> None:
    """parse_spec of a spec the API server has defaulted equals parse_spec of the bare one."""
    defaulted = {
        **MINIMAL,
        "databaseSecretRef": {"name": "db", "key": "DATABASE_URL"},
        "chunk": {"unit": "day", "size": 1},
        "parallelism": 1,
        "retry": {"limit": 2, "backoffSeconds": 30, "maxBackoffSeconds": 900},
        "suspend": False,
        "dryRun": False,
        "allowRecent": False,
        "verify": False,
        "allowFullRebuild": False,
        "allowCrossWindow": False,
    }
    assert parse_spec(defaulted) == parse_spec(MINIMAL)


def test_january_sample() -> None:
    spec = parse_spec(sample_spec("january-2024.yaml"))
    assert (spec.start_date, spec.end_date, spec.tenant_id, spec.models) == (
        dt.date(2024, 1, 1),
        dt.date(2024, 1, 31),
        None,
        (),
    )
    windows = spec.windows()
    assert len(windows) == 31
    assert windows[0] == Window(0, dt.date(2024, 1, 1), dt.date(2024, 1, 1))


def test_tenant_weekly_sample() -> None:
    spec = parse_spec(sample_spec("tenant-acme-weekly.yaml"))
    assert spec.tenant_id == "acme"
    assert spec.models == ("staging+", "tag:nightly")
    assert (spec.chunk_unit, spec.chunk_size, spec.parallelism) == ("week", 1, 2)
    assert len(spec.windows()) == 13  # 2024-01-01 is a Monday; Q1 2024 is 91 days


def test_monthly_year_sample_sets_every_field() -> None:
    spec = parse_spec(sample_spec("year-2023-monthly.yaml"))
    assert [w.label() for w in spec.windows()][:2] == ["2023-01-01..2023-01-31", "2023-02-01..2023-02-28"]
    assert len(spec.windows()) == 12
    assert spec.models == ("facts+", "path:models/facts")
    assert (spec.parallelism, spec.threads) == (4, 8)
    assert (spec.retry_limit, spec.backoff_seconds, spec.max_backoff_seconds) == (3, 60, 1800)
    assert (spec.active_deadline_seconds, spec.ttl_seconds_after_finished) == (7200, 86400)
    assert (spec.secret_name, spec.secret_key) == ("analytics-db", "DATABASE_URL")
    assert spec.service_account_name == "dbt-backfill-runner"
    assert spec.resources == {
        "limits": {"cpu": 2, "memory": "4Gi"},
        "requests": {"cpu": "500m", "memory": "1Gi"},
    }
    assert spec.node_selector == {"workload": "batch"}
    assert spec.tolerations == ({"key": "dedicated", "operator": "Equal", "value": "batch", "effect": "NoSchedule"},)


@pytest.mark.parametrize("path", sorted(SAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_sample_parses(path: Path) -> None:
    parse_spec(yaml.safe_load(path.read_text())["spec"])


def test_all_fields() -> None:
    spec = parse_spec(
        spec_of(
            tenantId="acme",
            image="ghcr.io/acme/dbt:1.2",
            suspend=True,
            dryRun=True,
            allowRecent=True,
            verify=True,
            allowFullRebuild=True,
            allowCrossWindow=True,
            retryFailed="2024-02-02T10:00",
            databaseSecretRef={"name": "db", "key": "url"},
        )
    )
    assert spec.image == "ghcr.io/acme/dbt:1.2"
    assert (spec.suspend, spec.dry_run, spec.allow_recent, spec.verify) == (True, True, True, True)
    assert (spec.allow_full_rebuild, spec.allow_cross_window) == (True, True)
    assert spec.retry_failed == "2024-02-02T10:00"
    assert spec.secret_key == "url"


def test_spec_is_frozen_hashable_and_detached_from_its_input() -> None:
    raw = spec_of(nodeSelector={"a": "b"}, tolerations=[{"operator": "Exists"}], resources={"limits": {"cpu": 1}})
    spec = parse_spec(raw)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.parallelism = 2  # type: ignore[misc]
    assert hash(spec) == hash(parse_spec(raw))
    raw["nodeSelector"]["a"] = "changed"
    raw["tolerations"][0]["operator"] = "Equal"
    raw["resources"]["limits"]["cpu"] = 2
    assert spec.node_selector == {"a": "b"}
    assert spec.tolerations == ({"operator": "Exists"},)
    assert spec.resources == {"limits": {"cpu": 1}}


def test_null_optional_fields_are_absent() -> None:
    nulls = dict.fromkeys(["tenantId", "models", "chunk", "retry", "image", "threads", "tolerations"])
    assert parse_spec({**MINIMAL, **nulls}) == parse_spec(MINIMAL)


def test_yaml_date_objects_are_accepted() -> None:
    """An unquoted date in a YAML file the CLI reads becomes a date object."""
    spec = yaml.safe_load("startDate: 2024-01-01\nendDate: 2024-01-02\ndatabaseSecretRef: {name: db}\n")
    assert isinstance(spec["startDate"], dt.date)
    assert parse_spec(spec).end_date == dt.date(2024, 1, 2)


# --- invalid specs -------------------------------------------------------------------------


def test_reversed_range_message_is_the_documented_one() -> None:
    assert error_of(spec_of(startDate="2024-02-01")) == "spec.endDate: start_date must be <= end_date"


def test_range_limit() -> None:
    start = dt.date(2020, 1, 1)
    last_ok = start + dt.timedelta(days=3659)
    assert len(parse_spec(spec_of(startDate=str(start), endDate=str(last_ok))).windows()) == 3660
    message = error_of(spec_of(startDate=str(start), endDate=str(last_ok + dt.timedelta(days=1))))
    assert message.startswith("spec.endDate: the range spans 3661 days; at most 3660")
    # The limit is on days, whatever the chunk unit: as in the CRD's CEL rule.
    assert error_of(spec_of(startDate="2000-01-01", endDate="2019-12-31", chunk={"unit": "month"})).startswith(
        "spec.endDate: the range spans"
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"startDate": None}, "spec.startDate: required"),
        ({"startDate": "2024-1-1"}, "spec.startDate: value must be a date in YYYY-MM-DD format"),
        ({"startDate": "2024-01-01\n"}, "spec.startDate: value must be a date"),
        (
            {"startDate": "\u0662\u0660\u0662\u0664-\u0660\u0661-\u0660\u0661"},
            "spec.startDate: value must be a date",
        ),
        ({"startDate": dt.datetime(2024, 1, 1)}, "spec.startDate: value must be a date"),
        ({"endDate": "2023-02-29"}, "spec.endDate: value is not a real calendar date"),
        ({"tenantId": "acme\n"}, "spec.tenantId: tenant_id must match"),
        ({"tenantId": "acme'--"}, "spec.tenantId: tenant_id must match"),
        ({"models": ["ok", "not ok"]}, "spec.models[1]: must be a dbt selector"),
        ({"models": ["fact\n"]}, "spec.models[0]: must be a dbt selector"),
        ({"models": []}, "spec.models: must not be empty"),
        ({"models": "staging+"}, "spec.models: must be a list"),
        ({"chunk": {"unit": "year"}}, "spec.chunk.unit: chunk unit must be one of day, week, month"),
        ({"chunk": {"size": 0}}, "spec.chunk.size: must be between 1 and 366, got 0"),
        ({"chunk": "day"}, "spec.chunk: must be an object, got str"),
        ({"parallelism": True}, "spec.parallelism: must be a whole number, got True"),
        ({"parallelism": 2.0}, "spec.parallelism: must be a whole number"),
        ({"parallelism": 33}, "spec.parallelism: must be between 1 and 32, got 33"),
        ({"retry": {"limit": 21}}, "spec.retry.limit: must be between 0 and 20"),
        ({"retry": {"backoffSeconds": 901}}, "spec.retry.maxBackoffSeconds: maxBackoffSeconds (900) must be"),
        ({"activeDeadlineSeconds": 0}, "spec.activeDeadlineSeconds: must be at least 1, got 0"),
        ({"ttlSecondsAfterFinished": -5}, "spec.ttlSecondsAfterFinished: must be between 0 and 2147483647, got -5"),
        ({"threads": 65}, "spec.threads: must be between 1 and 64"),
        ({"suspend": "true"}, "spec.suspend: must be true or false"),
        ({"databaseSecretRef": None}, "spec.databaseSecretRef: required"),
        ({"databaseSecretRef": {}}, "spec.databaseSecretRef.name: required"),
        (
            {"databaseSecretRef": {"name": "db", "password": "x"}},
            "spec.databaseSecretRef.password: unknown field",
        ),
        ({"databaseSecretRef": {"name": "postgres://u:p@h/d"}}, "spec.databaseSecretRef.name: must be"),
        ({"databaseUrl": "postgres://u:p@h/d"}, "spec.databaseUrl: unknown field"),
        ({"image": ""}, "spec.image: must not be empty"),
        ({"serviceAccountName": "Bad_Name"}, "spec.serviceAccountName: must be"),
        ({"resources": {"limits": {"cpu": "lots"}}}, "spec.resources.limits.cpu: must be a non-negative quantity"),
        ({"resources": {"limits": {"cpu": True}}}, "spec.resources.limits.cpu: must be a non-negative quantity"),
        ({"nodeSelector": {"zone": "a b"}}, "spec.nodeSelector.zone: must be a label value"),
        (
            {"tolerations": [{"operator": "Exists", "value": "v"}]},
            "spec.tolerations[0].value: value must be empty",
        ),
        ({"tolerations": [{"value": "v"}]}, "spec.tolerations[0].operator: operator must be Exists"),
        ({"tolerations": [{"key": "k", "tolerationSeconds": 5}]}, "spec.tolerations[0].tolerationSeconds: "),
        ({"tolerations": [{"key": "k", "effect": "Never"}]}, "spec.tolerations[0].effect: must be one of"),
        ({"retryFailed": "x" * 64}, "spec.retryFailed: at most 63 characters"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_invalid_spec_message(changes: dict[str, Any], message: str) -> None:
    assert error_of(spec_of(**changes)).startswith(message)


def test_spec_must_be_a_mapping() -> None:
    assert error_of(["startDate"]) == "spec: must be an object, got list"


def invalid_manifests() -> list[Any]:
    return [
        pytest.param(doc, id=doc["metadata"]["name"])
        for path in sorted(INVALID_DIR.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc is not None
    ]


@pytest.mark.parametrize("doc", invalid_manifests())
def test_parse_spec_rejects_what_the_crd_rejects(doc: dict[str, Any]) -> None:
    """Defence in depth: each manifest the API server refuses (test_crd.py) fails here too,
    with a message about the same field."""
    expected_field = doc["metadata"]["annotations"]["test.dbt-backfill.io/field"]
    message = error_of(doc["spec"])
    where = re.sub(r"\[\d+\]", "", message.split(":", 1)[0])
    assert where.startswith(expected_field), message


# --- backoff -------------------------------------------------------------------------------


def test_backoff_examples() -> None:
    spec = parse_spec(MINIMAL)  # 30s base, 900s cap
    assert [spec.backoff_for(n) for n in range(1, 8)] == [30, 60, 120, 240, 480, 900, 900]
    assert spec.backoff_for(10**9) == 900


@pytest.mark.parametrize("attempt", [0, -1, True, 1.0])
def test_backoff_needs_a_positive_attempt(attempt: Any) -> None:
    with pytest.raises(ValueError, match="attempt"):
        parse_spec(MINIMAL).backoff_for(attempt)


@given(
    base=st.integers(1, 3600),
    cap_extra=st.integers(0, 86400),
    attempt=st.integers(1, 200),
)
def test_backoff_is_monotonic_and_capped(base: int, cap_extra: int, attempt: int) -> None:
    cap = min(base + cap_extra, 86400)
    spec = parse_spec(spec_of(retry={"backoffSeconds": base, "maxBackoffSeconds": cap}))
    assert spec.backoff_for(1) == base
    assert spec.backoff_for(attempt) <= spec.backoff_for(attempt + 1)
    assert base <= spec.backoff_for(attempt) <= cap
    assert spec.backoff_for(attempt) == min(base * 2 ** (attempt - 1), cap)


# --- overlaps ------------------------------------------------------------------------------


def span(start: str, end: str, tenant: str | None = None) -> BackfillSpec:
    return parse_spec(spec_of(startDate=start, endDate=end, tenantId=tenant))


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (span("2024-01-01", "2024-01-31"), span("2024-01-31", "2024-02-10"), True),  # one shared day
        (span("2024-01-01", "2024-01-31"), span("2024-02-01", "2024-02-10"), False),  # adjacent
        (span("2024-01-01", "2024-12-31"), span("2024-06-01", "2024-06-01"), True),  # contained
        (span("2024-01-01", "2024-01-31", "acme"), span("2024-01-15", "2024-02-15", "acme"), True),
        (span("2024-01-01", "2024-01-31", "acme"), span("2024-01-15", "2024-02-15", "globex"), False),
        (span("2024-01-01", "2024-01-31", "acme"), span("2024-01-15", "2024-02-15"), True),  # all tenants
        (span("2024-01-01", "2024-01-31"), span("2024-03-01", "2024-03-31", "acme"), False),
    ],
)
def test_overlaps_examples(a: BackfillSpec, b: BackfillSpec, expected: bool) -> None:
    assert overlaps(a, b) is expected


@st.composite
def backfills(draw: st.DrawFn) -> BackfillSpec:
    start = draw(st.dates(dt.date(2023, 1, 1), dt.date(2024, 12, 31)))
    end = start + dt.timedelta(days=draw(st.integers(0, 120)))
    tenant = draw(st.sampled_from([None, "acme", "globex"]))
    return span(start.isoformat(), end.isoformat(), tenant)


@given(backfills(), backfills())
def test_overlaps_is_symmetric(a: BackfillSpec, b: BackfillSpec) -> None:
    assert overlaps(a, b) == overlaps(b, a)


@given(backfills(), backfills())
def test_overlaps_means_a_shared_day_and_tenant(a: BackfillSpec, b: BackfillSpec) -> None:
    days_a = {a.start_date + dt.timedelta(days=i) for i in range((a.end_date - a.start_date).days + 1)}
    days_b = {b.start_date + dt.timedelta(days=i) for i in range((b.end_date - b.start_date).days + 1)}
    tenants_meet = None in (a.tenant_id, b.tenant_id) or a.tenant_id == b.tenant_id
    assert overlaps(a, b) == (bool(days_a & days_b) and tenants_meet)
    assert overlaps(a, a)


# --- purity --------------------------------------------------------------------------------


def test_spec_module_is_pure() -> None:
    code = (
        "import sys, dbtbackfill.core.spec; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'kopf', 'kubernetes', 'sqlalchemy', 'dbt', 'psycopg', 'alembic'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


# --- totality over the CRD's domain ---------------------------------------------------------


@st.composite
def crd_valid_date_specs(draw: st.DrawFn) -> dict[str, Any]:
    """Specs the CRD admits as far as dates and chunking go: any YYYY-MM-DD up to 9999-12-31
    (year 0000 too, which Go's date format accepts), a range of at most 3660 days, any unit
    and size the schema allows."""
    start = draw(st.one_of(st.dates(), st.sampled_from([dt.date(9999, 1, 1), dt.date(9999, 12, 31)])))
    days = draw(st.integers(0, 3659))
    end = start + dt.timedelta(days=min(days, (dt.date.max - start).days))
    start_text = start.isoformat() if draw(st.integers(0, 19)) else "0000-01-01"
    return spec_of(
        startDate=start_text,
        endDate=end.isoformat(),
        chunk={"unit": draw(st.sampled_from(["day", "week", "month"])), "size": draw(st.integers(1, 366))},
    )


@settings(max_examples=300, deadline=None)
@given(crd_valid_date_specs())
def test_parse_spec_is_total_over_crd_valid_dates(spec: dict[str, Any]) -> None:
    """A spec either parses (with a plan that covers its range) or is a one-line SpecError:
    never an OverflowError or ValueError that would crash the reconciler."""
    try:
        parsed = parse_spec(spec)
    except SpecError as exc:
        assert "\n" not in str(exc)
        assert str(exc).startswith("spec.")
        return
    windows = parsed.windows()
    assert windows[0].start == parsed.start_date
    assert windows[-1].end == parsed.end_date


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        ({"requests": {"cpu": "2"}, "limits": {"cpu": "1500m"}}, "spec.resources.requests.cpu: must not be more than"),
        ({"requests": {"memory": "1Gi"}, "limits": {"memory": "1000Mi"}}, "spec.resources.requests.memory: must not"),
        (
            {"requests": {"example.com/gpu": 1}},
            "spec.resources.requests.example.com/gpu: example.com/gpu needs a",
        ),
        ({"requests": {"example.com/gpu": 1}, "limits": {"example.com/gpu": 2}}, "spec.resources.requests.example.com"),
        ({"limits": {"example.com/gpu": "500m"}}, "spec.resources.limits.example.com/gpu: an extended resource"),
        ({"limits": {"hugepages-2Mi": "1Gi"}}, "spec.resources: hugepages need a cpu or memory"),
        ({"limits": {"cpu": "1e2.5"}}, "spec.resources.limits.cpu: must be a non-negative quantity"),
        ({"limits": {"cpu": -1}}, "spec.resources.limits.cpu: must be a non-negative quantity"),
        ({"limits": {"gpu": 1}}, "spec.resources.limits.gpu: resource names must be"),
    ],
)
def test_resources_the_pod_api_would_refuse_are_invalid_specs(resources: dict[str, Any], message: str) -> None:
    """Each of these passes the CRD's per-value checks but would get a 422 on every Job create."""
    assert error_of(spec_of(resources=resources)).startswith(message)


@pytest.mark.parametrize(
    "resources",
    [
        {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "0.5", "memory": "1073741824"}},
        {"requests": {"cpu": "1e-3"}, "limits": {"cpu": "1m"}},
        {"requests": {"example.com/gpu": 2}, "limits": {"example.com/gpu": "2", "memory": "2Gi"}},
        {"limits": {"hugepages-1Gi": "2Gi", "memory": "4Gi"}, "requests": {"hugepages-1Gi": "2Gi"}},
    ],
)
def test_resources_the_pod_api_accepts_parse(resources: dict[str, Any]) -> None:
    assert parse_spec(spec_of(resources=resources)).resources is not None


@pytest.mark.parametrize(
    ("text", "amount"),
    [("500m", "0.5"), ("2Gi", str(2 * 1024**3)), ("1e3", "1000"), ("+.5", "0.5"), ("1E", "1e18"), ("1.", "1")],
)
def test_quantities_mean_what_kubernetes_means(text: str, amount: str) -> None:
    from decimal import Decimal

    from dbtbackfill.core.spec import _quantity

    assert _quantity(text) == Decimal(amount)
