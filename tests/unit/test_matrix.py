"""The tenant x window matrix: one DbtBackfill over many tenants, one cell (chunk) per
(tenant, window), planned, named, decided and summarised by the pure core.

Pure: no cluster, no database. The operator's real functions run on real specs.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbtbackfill.core.planner import MAX_TENANTS, Cell, PlanError, expand_runs, plan_cells, plan_windows
from dbtbackfill.core.spec import (
    BackfillSpec,
    ConfigMapKeyRef,
    SpecError,
    overlaps,
    parse_spec,
    parse_tenant_list,
    tenant_list_hash,
)
from dbtbackfill.operator import jobs
from dbtbackfill.operator.jobs import JobDefaults, Owner, build_job
from dbtbackfill.operator.reconcile import (
    ChunkState,
    Failure,
    JobView,
    Peer,
    blocking_peer,
    decide,
    peer_of,
    reset_failed,
    state_from_status,
    state_to_status,
)
from dbtbackfill.operator.status import expand_tenant_runs, matrix_date_ranges, summarise, tenant_progress

T0 = datetime(2024, 6, 1, 10, 0, 0, tzinfo=UTC)
OWNER = Owner(name="rebuild-all-tenants", namespace="analytics", uid="3f2b8c4e-1d2a-4b7e-9c1f-5a6b7c8d9e0f")
DEFAULTS = JobDefaults(image="registry.example.com/dbt-backfill:1.0.0")
BASE: dict[str, Any] = {"startDate": "2024-01-01", "endDate": "2024-01-03", "databaseSecretRef": {"name": "db"}}
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
STATUS_LIMIT = 64 * 1024
TENANT_ID = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,62}\Z")


def spec(**overrides: Any) -> BackfillSpec:
    return parse_spec({**BASE, **overrides})


# ----------------------------------------------------------------------------- spec


def test_tenant_ids_and_order_parse() -> None:
    parsed = spec(tenantIds=["acme", "globex_"], order="tenantMajor")
    assert parsed.tenant_ids == ("acme", "globex_")
    assert parsed.order == "tenantMajor"
    assert parsed.tenant_id is None
    assert parsed.tenants() == ("acme", "globex_")
    assert spec().order == "windowMajor"
    assert spec().tenants() == (None,)
    assert spec(tenantId="acme").tenants() == ("acme",)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tenantIds": ["acme", "bad id"]}, "spec.tenantIds[1]: tenant_id must match"),
        ({"tenantIds": ["acme", "acme\n"]}, "spec.tenantIds[1]: tenant_id must match"),
        ({"tenantIds": ["a" * 64]}, "spec.tenantIds[0]: tenant_id must match"),
        ({"tenantIds": ["acme", "acme"]}, "spec.tenantIds[1]: duplicate tenant id 'acme'"),
        ({"tenantIds": []}, "spec.tenantIds: must not be empty"),
        ({"tenantIds": "acme"}, "spec.tenantIds: must be a list"),
        ({"tenantIds": [f"t{i}" for i in range(MAX_TENANTS + 1)]}, "spec.tenantIds: at most 1000 tenants"),
        ({"tenantIds": ["a"], "tenantId": "b"}, "spec.tenantIds: set at most one of"),
        ({"tenantIds": ["a"], "tenantIdsFrom": {"name": "t", "key": "k"}}, "spec.tenantIds: set at most one of"),
        ({"tenantIdsFrom": {"name": "t"}}, "spec.tenantIdsFrom.key: required"),
        ({"tenantIdsFrom": {"name": "T_", "key": "k"}}, "spec.tenantIdsFrom.name: must be"),
        ({"tenantIdsFrom": {"name": "t", "key": "k", "x": 1}}, "spec.tenantIdsFrom.x: unknown field"),
        ({"order": "random"}, "spec.order: must be one of windowMajor, tenantMajor"),
    ],
)
def test_invalid_matrix_specs(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec({**BASE, **changes})
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_a_thousand_tenants_are_allowed() -> None:
    assert len(spec(tenantIds=[f"tenant-{i:04d}" for i in range(MAX_TENANTS)]).tenant_ids) == MAX_TENANTS


SOURCE = ConfigMapKeyRef("tenants", "ids")


def test_tenant_list_skips_blank_lines_and_comments() -> None:
    text = "# rebuilt after the FX fix\nacme\n\n  globex  \r\n# initech is paused\nhooli_\n"
    assert parse_tenant_list(text, SOURCE) == ("acme", "globex", "hooli_")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("acme\n\nbad id\n", "spec.tenantIdsFrom: ConfigMap tenants key ids line 3: tenant_id must match"),
        ("acme\nacme\n", "spec.tenantIdsFrom: ConfigMap tenants key ids line 2: duplicate tenant id 'acme'"),
        ("acme\nx;drop table t\n", "spec.tenantIdsFrom: ConfigMap tenants key ids line 2: tenant_id must match"),
        ("# nobody\n\n", "spec.tenantIdsFrom: ConfigMap tenants key ids: lists no tenant id"),
        ("\n".join(f"t{i}" for i in range(1001)), "spec.tenantIdsFrom: ConfigMap tenants key ids: at most 1000"),
    ],
)
def test_invalid_tenant_lists(text: str, message: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_tenant_list(text, SOURCE)
    assert str(err.value).startswith(message), str(err.value)


def test_a_config_map_spec_needs_its_tenants_to_plan() -> None:
    from_map = spec(tenantIdsFrom={"name": "tenants", "key": "ids"})
    assert from_map.tenants() is None
    with pytest.raises(ValueError, match="tenantIdsFrom"):
        from_map.cells()
    assert [c.tenant for c in from_map.cells(("a", "b"))] == ["a", "b"] * 3


def test_tenant_list_hash_depends_on_order_and_content() -> None:
    assert tenant_list_hash(["a", "b"]) == tenant_list_hash(("a", "b"))
    assert len({tenant_list_hash(["a", "b"]), tenant_list_hash(["b", "a"]), tenant_list_hash(["a"])}) == 3


# ----------------------------------------------------------------------------- planning


@settings(max_examples=150, deadline=None)
@given(
    days=st.integers(min_value=1, max_value=40),
    size=st.integers(min_value=1, max_value=3),
    unit=st.sampled_from(["day", "week", "month"]),
    tenants=st.lists(TENANT_ID, min_size=1, max_size=12, unique=True),
    order=st.sampled_from(["windowMajor", "tenantMajor"]),
)
def test_every_cell_is_planned_exactly_once_in_order(
    days: int, size: int, unit: str, tenants: list[str], order: str
) -> None:
    windows = plan_windows(date(2024, 1, 1), date(2024, 1, 1) + timedelta(days=days - 1), unit, size)
    cells = plan_cells(windows, tenants, order)
    listed = list(cells)
    assert len(cells) == len(listed) == len(windows) * len(tenants)
    assert [c.index for c in listed] == list(range(len(listed)))
    assert Counter((c.tenant, c.window_index) for c in listed) == Counter(
        (t, w.index) for t in tenants for w in windows
    )
    for cell in listed:
        window = windows[cell.window_index]
        assert (cell.start, cell.end) == (window.start, window.end)
        assert cells[cell.index] == cell
    keys = [(c.window_index, tenants.index(c.tenant or "")) for c in listed]
    if order == "tenantMajor":
        keys = [(t, w) for w, t in keys]
    assert keys == sorted(keys), "cells are not in the requested order"
    assert cells[-1] == listed[-1]
    assert cells[1:3] == listed[1:3]
    with pytest.raises(IndexError):
        cells[len(listed)]


def test_one_tenant_keeps_the_window_numbers() -> None:
    for tenants in ((None,), ("acme",)):
        one = spec(endDate="2024-01-31", **({"tenantId": tenants[0]} if tenants[0] else {}))
        assert [(c.index, c.start, c.end) for c in one.cells()] == [(w.index, w.start, w.end) for w in one.windows()]
        assert {c.tenant for c in one.cells()} == set(tenants)


def test_bad_orders_and_empty_tenant_lists_do_not_plan() -> None:
    windows = plan_windows(date(2024, 1, 1), date(2024, 1, 2))
    with pytest.raises(PlanError):
        plan_cells(windows, ["a"], "diagonal")
    with pytest.raises(PlanError):
        plan_cells(windows, [])


# ----------------------------------------------------------------------------- overlap guard


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ({"tenantIds": ["a", "b"]}, {"tenantIds": ["b", "c"]}, True),
        ({"tenantIds": ["a", "b"]}, {"tenantIds": ["c"]}, False),
        ({"tenantIds": ["a", "b"]}, {"tenantId": "b"}, True),
        ({"tenantIds": ["a", "b"]}, {"tenantId": "c"}, False),
        ({"tenantIds": ["a", "b"]}, {}, True),  # no tenant: all tenants
        ({"tenantIds": ["a"]}, {"tenantIds": ["a"], "startDate": "2024-01-04", "endDate": "2024-01-05"}, False),
        ({"tenantIds": ["a"]}, {"tenantIdsFrom": {"name": "t", "key": "k"}}, True),  # not read yet: all
    ],
)
def test_backfills_overlap_when_they_share_a_cell(a: dict[str, Any], b: dict[str, Any], expected: bool) -> None:
    sa, sb = spec(**a), spec(**b)
    assert overlaps(sa, sb) is expected
    assert overlaps(sb, sa) is expected


def test_a_config_map_peer_is_judged_by_its_snapshot() -> None:
    mine = spec(tenantIds=["a", "b"])
    peer = {
        "metadata": {"name": "older", "creationTimestamp": "2024-06-01T09:00:00Z"},
        "spec": {**BASE, "tenantIdsFrom": {"name": "t", "key": "k"}},
        "status": {"phase": "Running", "startTime": "2024-06-01T09:00:01Z", "tenants": {"ids": ["c", "d"]}},
    }
    seen = peer_of(peer)
    assert seen is not None and seen.tenants == ("c", "d")
    assert blocking_peer("mine", "2024-06-01T10:00:00Z", mine, [seen]) is None
    peer["status"]["tenants"]["ids"] = ["b"]
    seen = peer_of(peer)
    assert seen is not None
    assert blocking_peer("mine", "2024-06-01T10:00:00Z", mine, [seen]) == "older"
    # This backfill's own list comes from a ConfigMap too: its tenants are passed in.
    from_map = spec(tenantIdsFrom={"name": "t2", "key": "k"})
    assert blocking_peer("mine", "2024-06-01T10:00:00Z", from_map, [seen], ("x",)) is None
    assert blocking_peer("mine", "2024-06-01T10:00:00Z", from_map, [seen], ("b",)) == "older"
    other = Peer("p", "2024-06-01T09:00:00Z", spec(tenantId="x"), "Running", True)
    assert blocking_peer("mine", "2024-06-01T10:00:00Z", mine, [other]) is None


# ----------------------------------------------------------------------------- Jobs


def test_every_cell_gets_its_own_job_with_its_tenant() -> None:
    matrix = spec(tenantIds=["acme", "globex_", "a" * 63], parallelism=4)
    cells = matrix.cells()
    manifests = [build_job(OWNER, matrix, cell, 1, DEFAULTS) for cell in cells]
    names = [m["metadata"]["name"] for m in manifests]
    assert len(set(names)) == len(cells) == 9
    for cell, manifest in zip(cells, manifests, strict=True):
        name = manifest["metadata"]["name"]
        assert len(name) <= 63 and DNS_LABEL.fullmatch(name), name
        args = manifest["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[args.index("--tenant-id") + 1] == cell.tenant
        assert args[args.index("--chunk-index") + 1] == str(cell.index)
        assert args[args.index("--start-date") + 1] == cell.start.isoformat()
        labels = manifest["metadata"]["labels"]
        assert labels[jobs.LABEL_CHUNK] == str(cell.index)
        assert labels[jobs.LABEL_TENANT] == jobs.tenant_label(cell.tenant)
        assert manifest["metadata"]["annotations"][jobs.ANNOTATION_TENANT] == cell.tenant
    # A tenant's Jobs share its hash; the name never depends on the cell order.
    assert names[0].split("-")[-3] == names[3].split("-")[-3] != names[1].split("-")[-3]
    swapped = spec(tenantIds=["acme", "globex_", "a" * 63], order="tenantMajor")
    assert {m["metadata"]["name"] for m in (build_job(OWNER, swapped, c, 1, DEFAULTS) for c in swapped.cells())} == set(
        names
    )
    assert jobs.tenant_label("globex_") != "globex_"


def test_a_one_tenant_backfill_keeps_its_job_names() -> None:
    single = spec(tenantId="acme")
    for cell, window in zip(single.cells(), single.windows(), strict=True):
        assert build_job(OWNER, single, cell, 2, DEFAULTS)["metadata"]["name"] == jobs.job_name(OWNER, window.index, 2)


# ----------------------------------------------------------------------------- decisions


def _run(matrix: BackfillSpec, fail: set[tuple[str, str]]) -> tuple[ChunkState, list[Cell], list[Cell]]:
    """Drive ``decide`` to the end: every Job finishes at once; cells in ``fail`` (tenant, day) fail."""
    cells = matrix.cells()
    state = ChunkState()
    jobs_now: dict[str, JobView] = {}
    launched: list[Cell] = []
    now = T0
    for _ in range(200):
        decision = decide(matrix, cells, state, list(jobs_now.values()), now)
        state = state_from_status(json.loads(json.dumps({"chunkState": state_to_status(decision.state)})))
        state = ChunkState(**{**state.__dict__, "recent_failures": decision.state.recent_failures})
        assert len(decision.launch) <= matrix.parallelism
        for item in decision.launch:
            cell = cells[item.window.index]
            launched.append(cell)
            name = jobs.cell_job_name(OWNER, matrix, cell, item.attempt)
            bad = (cell.tenant or "", cell.start.isoformat()) in fail
            jobs_now[name] = JobView(name, cell.index, item.attempt, "failed" if bad else "succeeded", now, now)
        if decision.phase in ("Succeeded", "Failed"):
            return state, launched, list(cells)
        now += timedelta(minutes=30)
    raise AssertionError("never finished")


def test_cells_launch_in_order_within_parallelism_and_all_succeed() -> None:
    for order in ("windowMajor", "tenantMajor"):
        matrix = spec(tenantIds=["a", "b"], endDate="2024-01-02", parallelism=1, order=order)
        state, launched, _ = _run(matrix, set())
        assert state.succeeded == frozenset(range(4))
        window_major = [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
        expected = window_major if order == "windowMajor" else [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
        assert [(c.tenant, c.window_index) for c in launched] == expected


def test_retry_failed_reruns_only_the_failed_cells() -> None:
    matrix = spec(tenantIds=["a", "b", "c"], parallelism=9, retry={"limit": 0})
    state, _, cells = _run(matrix, {("b", "2024-01-02")})
    failed = [cells[i] for i in state.failed]
    assert [(c.tenant, c.start) for c in failed] == [("b", date(2024, 1, 2))]
    assert state.recent_failures[-1].tenant == "b"
    assert len(state.succeeded) == 8
    reset = reset_failed(state)
    decision = decide(matrix, cells, reset, [], T0 + timedelta(days=1))
    assert [(cells[item.window.index].tenant, cells[item.window.index].start) for item in decision.launch] == [
        ("b", date(2024, 1, 2))
    ]
    assert decision.launch[0].attempt == 2


# ----------------------------------------------------------------------------- status


def test_tenant_progress_groups_tenants_and_round_trips() -> None:
    matrix = spec(tenantIds=["a", "b", "c"], endDate="2024-01-05")
    cells = list(matrix.cells())
    succeeded = {c.index for c in cells if c.tenant != "b" or c.window_index in (0, 1, 3)}
    failed = {c.index for c in cells if c.tenant == "b" and c.window_index == 4}
    state = ChunkState(succeeded=frozenset(succeeded), failed=frozenset(failed))
    groups = tenant_progress(cells, state)
    assert groups == [
        {
            "tenants": ["a", "c"],
            "count": 2,
            "succeeded": 5,
            "failed": 0,
            "succeededRanges": ["2024-01-01..2024-01-05"],
            "failedRanges": [],
        },
        {
            "tenants": ["b"],
            "count": 1,
            "succeeded": 3,
            "failed": 1,
            "succeededRanges": ["2024-01-01..2024-01-02", "2024-01-04..2024-01-04"],
            "failedRanges": ["2024-01-05..2024-01-05"],
        },
    ]
    # The ranges give back exactly the cells they summarise.
    by_day = {(c.tenant, c.start): c.index for c in cells}
    back = set()
    for group in groups:
        for tenant in _tenants_of(group, groups, ["a", "b", "c"]):
            for text in group["succeededRanges"]:
                first, last = (date.fromisoformat(d) for d in text.split(".."))
                back |= {by_day[(tenant, first + timedelta(days=i))] for i in range((last - first).days + 1)}
    assert back == succeeded
    assert matrix_date_ranges(cells, succeeded) == ["2024-01-01..2024-01-02", "2024-01-04..2024-01-04"]
    status = summarise(
        windows=cells,
        state=state,
        phase="Running",
        running=frozenset(),
        parallelism=1,
        generation=1,
        previous=None,
        now=T0,
        matrix=True,
    )
    assert status["progress"] == f"{len(succeeded)}/15"
    assert status["failedRanges"] == ["2024-01-05..2024-01-05"]
    assert status["tenantProgress"] == groups


@settings(max_examples=60, deadline=None)
@given(
    tenants=st.integers(min_value=1, max_value=6),
    days=st.integers(min_value=1, max_value=20),
    order=st.sampled_from(["windowMajor", "tenantMajor"]),
    data=st.data(),
)
def test_tenant_progress_lists_every_tenant_once_with_its_counts(
    tenants: int, days: int, order: str, data: st.DataObject
) -> None:
    ids = [f"t{i}" for i in range(tenants)]
    cells = list(plan_cells(plan_windows(date(2024, 1, 1), date(2024, 1, days)), ids, order))
    done = data.draw(st.sets(st.sampled_from(range(len(cells)))))
    bad = data.draw(st.sets(st.sampled_from(range(len(cells))))) - done
    groups = tenant_progress(cells, ChunkState(succeeded=frozenset(done), failed=frozenset(bad)))
    assert sorted(t for g in groups for t in _tenants_of(g, groups, ids)) == sorted(ids)
    for group in groups:
        assert group["count"] == len(_tenants_of(group, groups, ids))
        for tenant in _tenants_of(group, groups, ids):
            assert group["succeeded"] == sum(1 for c in cells if c.tenant == tenant and c.index in done)
            assert group["failed"] == sum(1 for c in cells if c.tenant == tenant and c.index in bad)
    assert expand_runs(state_to_status(ChunkState(succeeded=frozenset(done)))["succeeded"]) == done


def _tenants_of(group: dict[str, Any], groups: list[dict[str, Any]], ids: list[str]) -> list[str]:
    return expand_tenant_runs(group["tenants"], ids)


def _largest_status(order: str, ids: list[str]) -> dict[str, Any]:
    """1,000 tenants x 365 days mid-run, in the worst shape fail-fast allows: 32 running and 32
    failed cells scattered over tenants and days, 5 waiting for a retry, 10 failures of 1 KiB."""
    from dbtbackfill.operator.controller import tenants_status

    matrix = spec(
        startDate="2023-01-01",
        endDate="2023-12-31",
        tenantIdsFrom={"name": "tenants", "key": "ids"},
        parallelism=32,
        order=order,
    )
    cells = matrix.cells(ids)
    rng = random.Random(7)  # noqa: S311  # a fixed, reproducible scatter, not a secret
    total = len(cells)
    frontier = total // 2
    failed = frozenset(rng.sample(range(frontier), 32))
    running = frozenset(rng.sample(range(frontier, frontier + 2000), 32))
    succeeded = frozenset(range(frontier)) - failed
    retrying = sorted(running)[:5]
    state = ChunkState(
        succeeded=succeeded,
        failed=failed,
        attempts={i: 3 for i in (*failed, *running)},
        retry_base={i: 1 for i in failed},
        retry_at={i: T0 for i in retrying},
        records=123_456_789_012,
        duration_count=len(succeeded),
        duration_total=len(succeeded) * 42.0,
        recent_failures=tuple(
            Failure(i, cells[i].label(), 3, "E" * 1024, T0, cells[i].tenant) for i in sorted(failed)[:10]
        ),
    )
    status = summarise(
        windows=cells,
        state=state,
        phase="Running",
        running=running,
        parallelism=32,
        generation=3,
        previous=None,
        now=T0,
        matrix=True,
    )
    status["tenants"] = tenants_status(matrix, ids)
    return status


@pytest.mark.parametrize("order", ["windowMajor", "tenantMajor"])
@pytest.mark.parametrize(
    "ids",
    [
        pytest.param([f"customer-{i:05d}-eu" for i in range(1000)], id="17-char-ids"),
        pytest.param([f"{i:08x}-1d2a-4b7e-9c1f-5a6b7c8d9e0f" for i in range(1000)], id="uuid-ids"),
    ],
)
def test_status_of_a_thousand_tenants_for_a_year_stays_under_64_kib(order: str, ids: list[str]) -> None:
    from tests.unit.test_status import assert_valid

    status = _largest_status(order, ids)
    assert_valid(status)  # every field is in the CRD's status schema: none is pruned
    size = len(json.dumps(status, separators=(",", ":")))
    assert size <= STATUS_LIMIT, size
    assert status["chunks"]["total"] == 365_000
    assert status["tenants"]["ids"] == ids
    assert len(status["tenantProgress"]) <= 70  # 2 fronts plus one entry per scattered failed cell
    groups = status["tenantProgress"]
    assert sorted(t for g in groups for t in _tenants_of(g, groups, ids)) == sorted(ids)


def test_a_failed_config_map_read_has_its_own_reason() -> None:
    from dbtbackfill.operator.status import api_failure_reason

    assert api_failure_reason("get", "configmaps/tenants") == "ConfigMapGetFailed"
