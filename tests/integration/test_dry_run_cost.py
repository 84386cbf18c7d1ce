"""Cost before launch: ``--dry-run`` reports each window's source rows (PostgreSQL's planner
estimates) and an ETA from the audit log's past chunks of the same models, on a real PostgreSQL
with real dbt, and writes nothing but, for an operator chunk, its estimate in its audit row."""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest

from dbtbackfill.core import audit, cost
from tests.integration.conftest import audit_rows, db_state, execute, query, run_cli

pytestmark = pytest.mark.integration

COST_RE = re.compile(r"^  cost (\S+): reads ~([\d,]+) source row\(s\)(.*)$", re.M)


def _costs(err: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2).replace(",", "")) for m in COST_RE.finditer(err)}


def test_dry_run_before_any_run_says_what_it_cannot_estimate_and_has_no_eta(
    pristine_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = db_state(pristine_url)
    assert run_cli("--start-date", "2024-02-01", "--end-date", "2024-02-02", "--chunk", "day", "--dry-run",
                   "--database-url", pristine_url) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert set(_costs(err)) == {"2024-02-01..2024-02-01", "2024-02-02..2024-02-02"}
    assert "eta: unknown: no completed chunk of these models in the audit log yet" in err.splitlines()
    assert re.search(r"^cost: note: model \w+: not estimated: .*does not exist", err, re.M), err
    assert db_state(pristine_url) == before


def test_dry_run_estimates_each_windows_source_rows_and_the_eta_from_past_runs(
    demo_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # One real run creates the models' tables and views and leaves its duration in the audit log.
    assert run_cli("--start-date", "2024-01-20", "--end-date", "2024-01-21", "--database-url", demo_url) == 0
    execute(demo_url, "analyze")
    capsys.readouterr()
    before = db_state(demo_url)

    # Two days with data (15 orders a day over 3 tenants), and a week without any.
    assert run_cli("--start-date", "2024-02-01", "--end-date", "2024-02-02", "--chunk", "day", "--dry-run",
                   "--database-url", demo_url) == 0  # fmt: skip
    err = capsys.readouterr().err
    costs = _costs(err)
    assert set(costs) == {"2024-02-01..2024-02-01", "2024-02-02..2024-02-02"}, err
    [(orders,)] = query(demo_url, "select count(*) from raw.orders where ordered_at::date = '2024-02-01'")
    assert orders > 0
    for rows in costs.values():
        assert orders / 4 <= rows <= orders * 10, (rows, orders, err)  # an estimate, of the right size
    assert "raw.orders ~" in err
    [line] = [x for x in err.splitlines() if x.startswith("eta: ")]
    assert re.fullmatch(r"eta: ~[\d,]+s, from 1 past chunk\(s\) of these models \([\d.]+s per day\)", line), line

    # Outside the data: the planner expects (next to) nothing there.
    assert run_cli("--start-date", "2019-01-07", "--end-date", "2019-01-13", "--chunk", "week", "--dry-run",
                   "--database-url", demo_url) == 0  # fmt: skip
    empty = _costs(capsys.readouterr().err)
    assert len(empty) == 1 and max(empty.values()) < min(costs.values()), empty
    assert db_state(demo_url) == before


def _data(url: str) -> dict[str, Any]:
    """db_state without the audit log: what a dry run must never touch."""
    return {k: v for k, v in db_state(url).items() if k != "audit"}


def test_a_dry_run_chunk_records_its_estimate_in_its_audit_row_and_the_eta_ignores_it(
    demo_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """What an operator chunk of a spec.dryRun backfill passes (--execution-id, --parent-id, ...):
    its estimate lands in its own audit row, where the operator sums the cells for the status."""
    assert run_cli("--start-date", "2024-01-20", "--end-date", "2024-01-21", "--database-url", demo_url) == 0
    execute(demo_url, "analyze")
    [real] = audit_rows(demo_url)
    history_before = cost.History(*audit.chunk_durations(audit.engine_for(demo_url), real["models"]))
    assert (history_before.chunks, real["dry_run"], real["estimated_source_rows"]) == (1, False, None)
    capsys.readouterr()
    before = _data(demo_url)
    parent = uuid.uuid4()
    cells = {}
    for index, (day, attempt) in enumerate([("2024-02-01", 1), ("2024-02-02", 2), ("2019-01-07", 1)]):
        chunk = uuid.uuid4()
        assert run_cli("--start-date", day, "--end-date", day, "--dry-run", "--database-url", demo_url,
                       "--execution-id", str(chunk), "--parent-id", str(parent), "--chunk-index", str(index),
                       "--attempt", str(attempt), "--backfill-name", "est", "--backfill-namespace", "shop",
                       "--backfill-uid", "u-est") == 0  # fmt: skip
        [printed] = _costs(capsys.readouterr().err).values()
        cells[chunk] = (index, day, printed)

    assert _data(demo_url) == before  # only the audit log was written
    rows = {r["id"]: r for r in audit_rows(demo_url) if r["parent_id"] == parent}
    assert set(rows) == set(cells)
    for chunk, (index, day, printed) in cells.items():
        row = rows[chunk]
        assert (row["kind"], row["status"], row["dry_run"], row["records_processed"]) == ("chunk", "completed", True, 0)
        assert (row["chunk_index"], str(row["start_date"])) == (index, day)
        assert row["estimated_source_rows"] == printed  # the number the dry run printed
    # The ETA of a later run goes by real chunks only: the dry runs' quick rows do not count.
    assert all(r["models"] == real["models"] for r in rows.values())
    assert cost.History(*audit.chunk_durations(audit.engine_for(demo_url), real["models"])) == history_before

    reported, total, largest = audit.dry_run_estimates(audit.engine_for(demo_url), parent)
    assert (reported, total) == (3, sum(p for _, _, p in cells.values()))
    heaviest = max(cells.values(), key=lambda c: (c[2], -c[0]))
    assert largest is not None and (largest.chunk_index, str(largest.start_date), largest.rows) == heaviest
    assert audit.dry_run_estimates(audit.engine_for(demo_url), uuid.uuid4()) == (0, 0, None)

    # A dry run without an execution id still writes nothing at all.
    state = db_state(demo_url)
    assert run_cli("--start-date", "2024-02-03", "--end-date", "2024-02-03", "--dry-run",
                   "--database-url", demo_url) == 0  # fmt: skip
    assert db_state(demo_url) == state
