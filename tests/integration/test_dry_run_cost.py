"""Cost before launch: ``--dry-run`` reports each window's source rows (PostgreSQL's planner
estimates) and an ETA from the audit log's past chunks of the same models, on a real PostgreSQL
with real dbt, and writes nothing."""

from __future__ import annotations

import re

import pytest

from tests.integration.conftest import db_state, execute, query, run_cli

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
