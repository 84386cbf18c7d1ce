"""Cost before launch, the pure part: reading the planner's row estimates out of EXPLAIN JSON,
combining them per window, the ETA from past chunk durations, and what is printed and stored."""

from __future__ import annotations

import json
from datetime import date
from typing import Any

from dbtbackfill.core.cost import (
    ESTIMATE_FIELDS,
    MAX_STATUS_WINDOWS,
    CellEstimate,
    CostReport,
    History,
    WindowCost,
    estimates_summary,
    merge_models,
    scan_rows,
)
from dbtbackfill.core.planner import plan_windows

# EXPLAIN (VERBOSE, FORMAT JSON) of a fact model reading a staging view over raw.orders (inlined)
# joined to raw.customers, as PostgreSQL 15 prints it (abridged to the keys that matter).
PLAN: list[dict[str, Any]] = [
    {
        "Plan": {
            "Node Type": "Hash Join",
            "Plan Rows": 14,
            "Plans": [
                {"Node Type": "Seq Scan", "Schema": "raw", "Relation Name": "orders", "Plan Rows": 15},
                {
                    "Node Type": "Hash",
                    "Plan Rows": 40,
                    "Plans": [
                        {"Node Type": "Index Scan", "Schema": "raw", "Relation Name": "customers", "Plan Rows": 40},
                    ],
                },
                {"Node Type": "Seq Scan", "Schema": "analytics", "Relation Name": "orders", "Plan Rows": 3},
            ],
        }
    }
]


def test_scan_rows_reads_only_the_windowed_relations() -> None:
    assert scan_rows(PLAN, {("raw", "orders")}) == {("raw", "orders"): 15}
    assert scan_rows(PLAN[0], {("raw", "orders"), ("raw", "customers")}) == {
        ("raw", "orders"): 15,
        ("raw", "customers"): 40,
    }
    assert scan_rows(PLAN, {("raw", "payments")}) == {}


def test_a_self_join_reads_its_rows_twice() -> None:
    twice = {"Plan": {"Plan Rows": 1, "Plans": [PLAN[0]["Plan"]["Plans"][0], PLAN[0]["Plan"]["Plans"][0]]}}
    assert scan_rows(twice, {("raw", "orders")}) == {("raw", "orders"): 30}


def test_a_source_read_by_several_models_counts_once() -> None:
    assert merge_models([{("raw", "orders"): 15}, {("raw", "orders"): 12, ("raw", "customers"): 4}]) == {
        ("raw", "orders"): 15,
        ("raw", "customers"): 4,
    }


NO_HISTORY = History()


def _report(rows: list[int], history: History = NO_HISTORY) -> CostReport:
    windows = plan_windows(date(2024, 1, 1), date(2024, 1, len(rows)))
    return CostReport(
        tuple(WindowCost(w, {("raw", "orders"): n} if n else {}) for w, n in zip(windows, rows, strict=True)),
        history,
    )


def test_eta_is_the_past_seconds_per_day_times_the_days_over_parallelism() -> None:
    report = _report([10, 20, 0, 5], History(chunks=6, days=12, seconds=30.0))
    assert report.total_rows == 35
    assert report.history.seconds_per_day == 2.5
    assert report.eta_seconds() == 10.0
    assert report.eta_seconds(parallelism=4, tenants=3) == 7.5
    assert _report([1]).eta_seconds() is None


def test_dry_run_lines() -> None:
    lines = _report([1234, 0], History(chunks=2, days=2, seconds=3.0)).lines()
    assert lines == [
        "  cost 2024-01-01..2024-01-01: reads ~1,234 source row(s) (raw.orders ~1,234)",
        "  cost 2024-01-02..2024-01-02: reads ~0 source row(s)",
        "cost: ~1,234 source row(s) over 2 window(s) (planner estimates)",
        "eta: ~3s, from 2 past chunk(s) of these models (1.50s per day)",
    ]
    unknown = CostReport(_report([1]).windows, notes=("model m: not estimated: x",)).lines()
    assert unknown[-2:] == [
        "eta: unknown: no completed chunk of these models in the audit log yet",
        "cost: note: model m: not estimated: x",
    ]


def test_the_status_summary_is_bounded_and_keeps_the_heaviest_windows_in_order() -> None:
    rows = [i % 50 for i in range(365)]
    summary = _report(rows[:31], History(1, 1, 1.0)).summary(parallelism=2)
    assert summary["estimatedSourceRows"] == sum(rows[:31])
    assert summary["estimatedSeconds"] == 15.5
    year = CostReport(
        tuple(
            WindowCost(w, {("raw", "orders"): rows[w.index]})
            for w in plan_windows(date(2023, 1, 1), date(2023, 12, 31))
        )
    ).summary()
    heaviest = year["heaviestWindows"]
    assert len(heaviest) == MAX_STATUS_WINDOWS
    assert all(h["estimatedSourceRows"] >= 42 for h in heaviest)
    assert [h["window"] for h in heaviest] == sorted(h["window"] for h in heaviest)
    assert year["estimatedSeconds"] is None and year["pastChunks"] == 0


# --- the dry-run chunks' recorded estimates, summarised for status.costEstimate ----------------


def test_the_estimates_summary_names_the_total_the_reporting_cells_and_the_largest_cell() -> None:
    largest = CellEstimate(41, "tenant-007", date(2024, 1, 6), date(2024, 1, 6), 12_345)
    assert estimates_summary(120, 987_654, largest) == {
        "estimatedSourceRows": 987_654,
        "reportedCells": 120,
        "largestCell": {"chunk": 41, "window": "2024-01-06..2024-01-06", "tenant": "tenant-007",
                        "estimatedSourceRows": 12_345},
    }  # fmt: skip
    untenanted = estimates_summary(1, 5, CellEstimate(0, None, date(2024, 1, 1), date(2024, 1, 7), 5))
    assert "tenant" not in untenanted["largestCell"]
    assert estimates_summary(0, 0, None) == {"estimatedSourceRows": 0, "reportedCells": 0, "largestCell": None}
    assert set(estimates_summary(0, 0, None)) | {"settledCellsRead"} == set(ESTIMATE_FIELDS)


def test_the_estimates_summary_stays_small_for_1000_tenants_by_365_days() -> None:
    """Every cell reported, the longest tenant id the spec allows, counts near int64: a few
    hundred bytes, the same as for one cell (the status limit is 64 KiB for the whole object)."""
    tenants = ["t" * 63 if i == 999 else f"tenant-{i:04d}" for i in range(1000)]
    cells = [(t, day) for day in range(365) for t in tenants]
    rows = {
        cell: (i * 7919) % 1_000_000 + (10**15 if cell == (tenants[-1], 364) else 0) for i, cell in enumerate(cells)
    }
    top = max(rows, key=lambda c: rows[c])
    index = cells.index(top)
    day = date(2024, 1, 1).toordinal() + top[1]
    largest = CellEstimate(index, top[0], date.fromordinal(day), date.fromordinal(day), rows[top])
    summary = estimates_summary(len(cells), sum(rows.values()), largest)
    assert summary["reportedCells"] == 365_000
    assert summary["largestCell"]["tenant"] == "t" * 63 and summary["largestCell"]["chunk"] == 364_999
    one = estimates_summary(1, 1, CellEstimate(0, "t" * 63, date(2024, 1, 1), date(2024, 1, 1), 1))
    size = len(json.dumps(summary))
    digits = sum(len(str(n)) - 1 for n in (sum(rows.values()), len(cells), index, rows[top]))
    assert size < 400 and size - len(json.dumps(one)) == digits  # only the numbers' digits grow
