"""The heat map's model: which day sits in which cell, and which state it shows."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from dbtbackfill.core.planner import plan_cells, plan_windows
from dbtbackfill.kubectl import calendar_view as cv
from dbtbackfill.kubectl.calendar_view import Chunk
from dbtbackfill.kubectl.plugin import PluginError, chunk_for, connect, plan_of, render_status, status_view

NOW = datetime(2024, 2, 1, 12, 0, tzinfo=UTC)


def grid_days(grid: cv.Grid) -> list[date]:
    return [cell.day for row in grid.rows for cell in row.cells if cell is not None]


@given(
    st.dates(min_value=date(2000, 1, 1), max_value=date(2030, 12, 31)),
    st.integers(min_value=0, max_value=400),
)
def test_every_day_of_the_range_is_in_the_week_grid_exactly_once(start: date, length: int) -> None:
    end = start + timedelta(days=length)
    grid = cv.weeks_grid(start, end, {})
    days = grid_days(grid)
    assert sorted(days) == [start + timedelta(days=i) for i in range(length + 1)]
    assert len(days) == len(set(days))
    for row in grid.rows:
        assert len(row.cells) == 7
        assert row.week.weekday() == 0
        for offset, cell in enumerate(row.cells):
            if cell is not None:
                assert cell.day == row.week + timedelta(days=offset)  # Monday first, in order


@given(
    st.dates(min_value=date(2000, 1, 1), max_value=date(2030, 12, 31)),
    st.integers(min_value=0, max_value=120),
    st.integers(min_value=2, max_value=5),
)
def test_every_day_is_one_row_of_the_tenant_grid_with_a_cell_per_tenant(start: date, length: int, n: int) -> None:
    end = start + timedelta(days=length)
    tenants = [f"t{i}" for i in range(n)]
    grid = cv.tenants_grid(start, end, tenants, {})
    assert [row.cells[0].day for row in grid.rows if row.cells[0]] == [
        start + timedelta(days=i) for i in range(length + 1)
    ]
    assert all(len(row.cells) == n and {c.day for c in row.cells if c} == {row.cells[0].day} for row in grid.rows)
    assert grid.columns == tuple(tenants)
    assert all(row.week == cv.monday_of(row.cells[0].day) for row in grid.rows if row.cells[0])


def test_chunk_states_from_the_recorded_chunk_state() -> None:
    status = {
        "phase": "Running",
        "chunkState": {
            "succeeded": [[0, 1]],
            "failed": [[3, 3]],
            "attempts": {"2": 1, "3": 3, "4": 2},
            "retryAt": {"4": "2024-01-01T00:00:00Z"},
        },
    }
    assert cv.chunk_states(status, 6) == ["succeeded", "succeeded", "running", "failed", "retrying", "pending"]
    assert cv.chunk_states({**status, "phase": "Suspended"}, 6)[2] == "pending"
    assert cv.chunk_states({**status, "phase": "Cancelled"}, 6)[2:] == ["cancelled", "failed", "cancelled", "cancelled"]
    assert cv.chunk_states(None, 2) == ["pending", "pending"]


def test_a_week_chunk_colours_each_of_its_days_and_an_aggregate_shows_the_worst_tenant() -> None:
    windows = plan_windows(date(2024, 1, 1), date(2024, 1, 14), "week", 1)
    cells = plan_cells(windows, ["a", "b"], "windowMajor")
    chunks = cv.chunks_of(cells)
    states: list[cv.CellState] = ["succeeded", "succeeded", "succeeded", "failed"]  # b's second week failed
    by_tenant = cv.calendar(date(2024, 1, 1), date(2024, 1, 14), chunks, states, max_columns=12)
    assert by_tenant.layout == "tenants" and by_tenant.columns == ("a", "b")
    assert [(r.cells[0].state, r.cells[1].state) for r in by_tenant.rows if r.cells[0] and r.cells[1]] == [
        ("succeeded", "succeeded")
    ] * 7 + [("succeeded", "failed")] * 7
    summary = cv.calendar(date(2024, 1, 1), date(2024, 1, 14), chunks, states, max_columns=1)
    assert summary.layout == "weeks"
    assert [[c.state for c in r.cells if c] for r in summary.rows] == [["succeeded"] * 7, ["failed"] * 7]


def test_one_tenant_uses_the_week_calendar() -> None:
    chunks = [
        Chunk(0, "acme", date(2024, 1, 3), date(2024, 1, 3)),
        Chunk(1, "acme", date(2024, 1, 4), date(2024, 1, 4)),
    ]
    grid = cv.calendar(date(2024, 1, 3), date(2024, 1, 4), chunks, ["running", "pending"], 12)
    assert grid.layout == "weeks" and grid.columns == cv.WEEKDAYS
    (row,) = grid.rows
    assert row.label == "2024-01-01"
    assert [c.state if c else None for c in row.cells] == [None, None, "running", "pending", None, None, None]


def test_estimate_is_the_mean_observed_duration_times_the_waves_left() -> None:
    status = {"chunkState": {"succeeded": [[0, 1]], "durations": {"count": 2, "totalSeconds": 20.0}}}
    est = cv.estimate(status, total=7, parallelism=2, now=NOW)
    assert est.remaining == 5 and est.mean_seconds == 10.0 and est.observed == 2
    assert est.finish == NOW + timedelta(seconds=30)  # 5 chunks, 2 at a time: 3 waves of 10 s
    assert cv.estimate({}, total=3, parallelism=1, now=NOW).finish is None


def body(spec: dict[str, object], status: dict[str, object] | None = None) -> dict[str, object]:
    return {
        "metadata": {"name": "bf", "namespace": "ns", "uid": "u1"},
        "spec": {"databaseSecretRef": {"name": "db"}, **spec},
        "status": status or {},
    }


def test_status_view_of_a_matrix_has_a_column_per_tenant_and_the_last_failures() -> None:
    obj = body(
        {"startDate": "2024-01-01", "endDate": "2024-01-03", "tenantIds": ["acme", "globex"]},
        {
            "phase": "Failed",
            "progress": "5/6",
            "chunkState": {"succeeded": [[0, 2], [4, 5]], "failed": [[3, 3]], "attempts": {"3": 2}},
            "recentFailures": [
                {"chunk": 3, "tenant": "globex", "window": "2024-01-02..2024-01-02", "attempts": 2,
                 "message": "division by zero", "time": "2024-01-05T00:00:00Z"},
            ],
        },
    )  # fmt: skip
    view = status_view(obj, NOW)
    assert view.grid.layout == "tenants" and view.grid.columns == ("acme", "globex")
    states = {
        (r.label[:10], t): c.state for r in view.grid.rows for t, c in zip(view.grid.columns, r.cells, strict=True) if c
    }
    assert states[("2024-01-02", "globex")] == "failed"  # windowMajor: cell 3 is day 2 of the second tenant
    assert sum(s == "succeeded" for s in states.values()) == 5
    assert view.counts == {"failed": 1, "succeeded": 5}
    console = Console(record=True, width=120, no_color=True)
    render_status(view, console, NOW)
    text = console.export_text()
    assert "division by zero" in text and "globex" in text
    assert "ETA: nothing left to run; 1 failed chunk(s) wait for `kubectl dbf retry`" in text


def test_status_shows_a_dry_runs_estimate_of_the_real_run() -> None:
    estimate = {"cells": 6, "days": 6, "estimatedSeconds": 95.0, "pastChunks": 4, "estimatedSourceRows": 123456,
                "reportedCells": 5, "settledCellsRead": 5,
                "largestCell": {"chunk": 3, "window": "2024-01-02..2024-01-02", "tenant": "globex",
                                "estimatedSourceRows": 40000}}  # fmt: skip
    spec = {"startDate": "2024-01-01", "endDate": "2024-01-03", "tenantIds": ["acme", "globex"], "dryRun": True}
    view = status_view(body(spec, {"phase": "Running", "progress": "5/6", "costEstimate": estimate}), NOW)
    assert view.cost == (
        "dry run: ~123,456 source row(s) over 5/6 cell(s) estimated; largest tenant globex 2024-01-02..2024-01-02"
        " ~40,000; real run ~1m35s from 4 past chunk(s)"
    )
    console = Console(record=True, width=200, no_color=True)
    render_status(view, console, NOW)
    assert view.cost in console.export_text()
    # Before any cell reported, and without past chunks: it says what it lacks.
    bare = status_view(body(spec, {"costEstimate": {"cells": 6, "estimatedSeconds": None, "pastChunks": 0}}), NOW)
    assert bare.cost == "dry run: real run: no ETA (no past chunk of these models)"
    assert status_view(body(spec, {"phase": "Running"}), NOW).cost is None


def test_logs_picks_the_cell_of_the_day_and_tenant_or_says_why_not() -> None:
    plan = plan_of(body({"startDate": "2024-01-01", "endDate": "2024-01-03", "tenantIds": ["acme", "globex"]}))
    assert chunk_for(plan, date(2024, 1, 2), "globex").index == 3
    for day, tenant, says in (
        (date(2024, 2, 1), None, "no chunk covers 2024-02-01"),
        (date(2024, 1, 2), None, "pass --tenant"),
        (date(2024, 1, 2), "initech", "not one of the backfill's tenants"),
    ):
        try:
            chunk_for(plan, day, tenant)
        except Exception as exc:
            assert says in str(exc)
        else:
            raise AssertionError(f"{day} {tenant} found a chunk")


KUBECONFIG = """
apiVersion: v1
kind: Config
clusters:
- name: c
  cluster: {server: "https://127.0.0.1:1"}
users:
- name: u
  user: {token: t}
contexts:
- name: work
  context: {cluster: c, user: u, namespace: analytics}
- name: bare
  context: {cluster: c, user: u}
current-context: work
"""


def test_namespace_and_context_resolve_as_kubectl_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kubectl passes plugins no flags: -n, --context and --kubeconfig are resolved by the plugin
    (a real kubeconfig file read by the kubernetes client; no server is contacted)."""
    path = tmp_path / "config"
    path.write_text(KUBECONFIG)
    assert connect(str(path), None, None).namespace == "analytics"  # the current context's
    assert connect(str(path), "bare", None).namespace == "default"
    assert connect(str(path), "bare", "other").namespace == "other"
    monkeypatch.setenv("KUBECONFIG", str(path))
    assert connect(None, None, None).namespace == "analytics"
    with pytest.raises(PluginError, match='context "nope" does not exist'):
        connect(str(path), "nope", None)
    with pytest.raises(PluginError, match="kubeconfig"):
        connect(str(tmp_path / "missing"), None, None)


def test_a_failure_message_becomes_dbt_error_and_cause_on_one_line() -> None:
    message = (
        "window 2024-01-04..2024-01-04: zz_e2e_broken: Database Error in model zz_e2e_broken (models/x.sql)\n"
        "  division by zero\n  compiled code at \n/tmp/node/pods/p/volumes/scratch/dbt/target/run/x.sql"
    )
    assert cv.failure_summary(message) == (
        "zz_e2e_broken: Database Error in model zz_e2e_broken (models/x.sql) division by zero"
    )
    assert cv.failure_summary("x" * 300, limit=10) == "x" * 9 + "…"
    assert cv.failure_summary("no Pod started within startDeadlineSeconds=600: ErrImageNeverPull") == (
        "no Pod started within startDeadlineSeconds=600: ErrImageNeverPull"
    )
