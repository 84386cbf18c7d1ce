"""``run_dbt_backfill`` end to end: real PostgreSQL, real dbt, the audit log and the exit codes.

Runs call ``cli.run_backfill`` in-process (each call parses the project once, then runs each
window on the parsed manifest); one test runs ``python -m scripts.run_dbt_backfill`` in a
subprocess to prove the documented entry point itself. Demo data: 3 tenants, 2024-01-20 ..
2024-03-04, 5 orders per tenant-day (see ``conftest.py``), so February is a window with data
on both sides of it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from dbtbackfill.core import audit, planner
from tests.conftest import REPO_ROOT
from tests.integration.conftest import (
    FACTS,
    TENANTS,
    WINDOW_DAY,
    audit_rows,
    db_state,
    execute,
    fact_checksums,
    load_demo,
    nonempty_lines,
    project_with_model,
    query,
    register_url,
    run_cli,
    run_tool,
    runner_env,
    table_exists,
)

pytestmark = pytest.mark.integration

FEB = ("--start-date", "2024-02-01", "--end-date", "2024-02-29")
FEB_START, FEB_END = date(2024, 2, 1), date(2024, 2, 29)
IN_FEB = "{day} between date '2024-02-01' and date '2024-02-29'"


@pytest.fixture(autouse=True)
def _isolated(fresh_env: None, dispose_engines: None) -> None:
    """Every test: clean env (no DATABASE_URL), private dbt target dir, engines disposed after."""


# ------------------------------------------------------------------ reading the CLI's output

_WINDOW_RE = re.compile(r"^window (\d+)/(\d+) (\S+) (ok|FAILED) rows=(\d+) [0-9.]+s$")
_SUMMARY_RE = re.compile(
    r"^backfill (completed|FAILED): (\d+)/(\d+) window\(s\)(?:, (\d+) window\(s\) not attempted)?, "
    r"(\d+) row\(s\), [0-9.]+s \(execution ([0-9a-f-]{36})\)$"
)


@dataclass(frozen=True)
class WindowLine:
    number: int
    planned: int
    label: str
    status: str
    rows: int


@dataclass(frozen=True)
class Summary:
    verdict: str
    done: int
    planned: int
    not_attempted: int
    rows: int
    execution_id: uuid.UUID


def report(err: str) -> tuple[list[WindowLine], Summary]:
    """The per-window lines and the one summary line a (non-tty) run prints on stderr."""
    windows = [
        WindowLine(int(m[1]), int(m[2]), m[3], m[4], int(m[5])) for m in map(_WINDOW_RE.match, err.splitlines()) if m
    ]
    summaries = [m for m in map(_SUMMARY_RE.match, err.splitlines()) if m]
    assert len(summaries) == 1, err
    m = summaries[0]
    return windows, Summary(m[1], int(m[2]), int(m[3]), int(m[4] or 0), int(m[5]), uuid.UUID(m[6]))


def window_days(url: str, table: str, schema: str = "analytics") -> tuple[date | None, date | None, int]:
    """First and last UTC window day in a fact table, and its row count."""
    day = sql.SQL(WINDOW_DAY[table])
    stmt = sql.SQL("select min({day}), max({day}), count(*) from {table}").format(
        day=day, table=sql.Identifier(schema, table)
    )
    [(low, high, count)] = query(url, stmt)
    return low, high, count


_RAW_COUNTS = {
    "fact_orders": "select count(*) from raw.orders where (ordered_at at time zone 'UTC')::date between %s and %s",
    "fact_customers": (
        "select count(*) from raw.customers where (created_at at time zone 'UTC')::date between %s and %s"
    ),
    "fact_daily_revenue": (
        "select count(distinct (tenant_id, (ordered_at at time zone 'UTC')::date)) from raw.orders"
        " where (ordered_at at time zone 'UTC')::date between %s and %s"
    ),
}


def raw_counts(url: str, start: date, end: date) -> dict[str, int]:
    """How many rows each fact must hold for a window, counted from raw.* directly."""
    return {table: int(query(url, stmt, start, end)[0][0]) for table, stmt in _RAW_COUNTS.items()}


# ------------------------------------------------------------------ 1. happy path


def test_month_backfill_writes_one_completed_audit_row_and_only_the_window(
    demo_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The demo data reaches past February on both sides, so "only the window" means something.
    [(first_order, last_order)] = query(
        demo_url,
        "select min(ordered_at at time zone 'UTC')::date, max(ordered_at at time zone 'UTC')::date from raw.orders",
    )
    assert first_order < FEB_START and last_order > FEB_END

    assert run_cli(*FEB, "--database-url", demo_url) == 0

    err = capsys.readouterr().err
    assert "plan: 1 window(s) 2024-02-01..2024-02-29, all tenants" in err
    windows, summary = report(err)
    assert [(w.label, w.status) for w in windows] == [("2024-02-01..2024-02-29", "ok")]
    reported = sum(w.rows for w in windows)
    assert summary == Summary("completed", 1, 1, 0, reported, summary.execution_id)
    assert reported > 0

    [row] = audit_rows(demo_url)
    assert row["id"] == summary.execution_id
    assert (row["kind"], row["status"], row["tenant_id"], row["parent_id"]) == ("run", "completed", None, None)
    assert (row["start_date"], row["end_date"]) == (FEB_START, FEB_END)
    assert row["duration_seconds"] > 0
    assert row["records_processed"] == reported
    assert row["error_message"] is None
    assert row["finished_at"] is not None and row["finished_at"] >= row["created_at"]
    assert set(FACTS) <= set(row["models"])

    # Facts hold exactly February: nothing outside it, and every raw row of it.
    expected = raw_counts(demo_url, FEB_START, FEB_END)
    for table in FACTS:
        low, high, count = window_days(demo_url, table)
        assert low is not None and high is not None, table
        assert low >= FEB_START and high <= FEB_END, (table, low, high)
        assert count == expected[table], table
    # A first build inserts every fact row once: the rows dbt reported are those rows.
    assert sum(count for count, _ in fact_checksums(demo_url).values()) == reported


# ------------------------------------------------------------------ 2. idempotency


def test_running_the_same_window_twice_changes_nothing(demo_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(*FEB, "--database-url", demo_url) == 0
    first = fact_checksums(demo_url)
    assert all(count > 0 for count, _ in first.values())

    assert run_cli(*FEB, "--database-url", demo_url) == 0
    assert fact_checksums(demo_url) == first

    rows = audit_rows(demo_url)
    assert len(rows) == 2
    assert rows[0]["id"] != rows[1]["id"]
    assert [r["status"] for r in rows] == ["completed", "completed"]
    assert rows[0]["records_processed"] == rows[1]["records_processed"] > 0
    capsys.readouterr()


# ------------------------------------------------------------------ 3. tenant isolation


def test_tenant_scoped_backfill_rewrites_only_that_tenant(demo_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    url = demo_url
    assert run_cli("--start-date", "2024-01-13", "--end-date", "2024-03-04", "--database-url", url) == 0
    before = {t: fact_checksums(url, where=f"tenant_id = '{t}'") for t in TENANTS}
    outside_before = fact_checksums(url, where=f"tenant_id = 'tenant-001' and not ({IN_FEB})")

    # Change raw rows inside the window, for the tenant we backfill AND for another one.
    deleted: dict[str, int] = {}
    for tenant, bump in (("tenant-001", Decimal("1.00")), ("tenant-002", Decimal("100.00"))):
        assert (
            execute(
                url,
                "update raw.orders set amount = amount + %s where tenant_id = %s"
                " and (ordered_at at time zone 'UTC')::date between '2024-02-10' and '2024-02-12'",
                bump,
                tenant,
            )
            == 15
        )
        [(order_id,)] = query(
            url,
            "select min(order_id) from raw.orders"
            " where tenant_id = %s and (ordered_at at time zone 'UTC')::date = '2024-02-15'",
            tenant,
        )
        assert execute(url, "delete from raw.orders where tenant_id = %s and order_id = %s", tenant, order_id) == 1
        deleted[tenant] = order_id
        assert (
            execute(
                url,
                "update raw.customers set name = name || ' Jr.' where tenant_id = %s"
                " and (created_at at time zone 'UTC')::date = '2024-02-20'",
                tenant,
            )
            > 0
        )

    assert run_cli(*FEB, "--tenant-id", "tenant-001", "--database-url", url) == 0
    assert "tenant tenant-001" in capsys.readouterr().err

    # Every other tenant: byte-identical, although tenant-002's raw data changed too.
    for tenant in TENANTS[1:]:
        assert fact_checksums(url, where=f"tenant_id = '{tenant}'") == before[tenant], tenant
    # The scoped tenant outside the window: untouched.
    assert fact_checksums(url, where=f"tenant_id = 'tenant-001' and not ({IN_FEB})") == outside_before
    # The scoped tenant inside the window: rebuilt from the changed raw rows.
    feb_orders = (
        "select order_id, amount from {table} where tenant_id = %s"
        " and (ordered_at at time zone 'UTC')::date between '2024-02-01' and '2024-02-29' order by 1"
    )
    assert query(url, feb_orders.format(table="analytics.fact_orders"), "tenant-001") == query(
        url, feb_orders.format(table="raw.orders"), "tenant-001"
    )
    assert not query(
        url,
        "select 1 from analytics.fact_orders where tenant_id = %s and order_id = %s",
        "tenant-001",
        deleted["tenant-001"],
    )
    revenue = (
        "select order_date, gross_revenue, order_count from analytics.fact_daily_revenue"
        " where tenant_id = %s and order_date between '2024-02-10' and '2024-02-15' order by 1"
    )
    raw_revenue = (
        "select (ordered_at at time zone 'UTC')::date, sum(amount), count(*) from raw.orders where tenant_id = %s"
        " and (ordered_at at time zone 'UTC')::date between '2024-02-10' and '2024-02-15' group by 1 order by 1"
    )
    assert query(url, revenue, "tenant-001") == query(url, raw_revenue, "tenant-001")
    assert query(
        url,
        "select count(*) from analytics.fact_customers where tenant_id = %s and customer_name like '%% Jr.'",
        "tenant-001",
    ) == query(
        url,
        "select count(*) from raw.customers where tenant_id = %s"
        " and (created_at at time zone 'UTC')::date = '2024-02-20'",
        "tenant-001",
    )
    # ... while tenant-002 still shows its old numbers (its raw change waits for its own backfill).
    assert query(url, revenue, "tenant-002") != query(url, raw_revenue, "tenant-002")
    assert query(
        url,
        "select 1 from analytics.fact_orders where tenant_id = %s and order_id = %s",
        "tenant-002",
        deleted["tenant-002"],
    )

    scoped = audit_rows(url)[-1]
    assert (scoped["tenant_id"], scoped["status"]) == ("tenant-001", "completed")


# ------------------------------------------------------------------ 4. chunking


def test_weekly_chunks_equal_one_unchunked_run(
    demo_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    start, end = date(2024, 1, 24), date(2024, 3, 2)  # a Wednesday to a Saturday: both ends clipped
    expected = planner.plan_windows(start, end, "week", 1)
    argv = ("--start-date", start.isoformat(), "--end-date", end.isoformat(), "--database-url", demo_url)

    monkeypatch.setenv("DBT_PG_SCHEMA", "chunked")
    assert run_cli(*argv, "--chunk", "week") == 0
    err = capsys.readouterr().err
    # A fresh schema: dbt creates the tables in the first window, the rest run compiled.
    assert 'engine: dbt for the first window: table "' in err
    assert "engine: compiled: dbt compiled 3 model(s) once; one transaction per window" in err
    n = len(expected)
    assert f"plan: {n} window(s) {start}..{end}" in err
    windows, summary = report(err)
    assert [(w.number, w.planned, w.label, w.status) for w in windows] == [
        (w.index + 1, n, w.label(), "ok") for w in expected
    ]
    assert f"backfill completed: {n}/{n} window(s), " in err
    assert (summary.done, summary.planned, summary.rows) == (n, n, sum(w.rows for w in windows))

    monkeypatch.setenv("DBT_PG_SCHEMA", "analytics")
    assert run_cli(*argv) == 0
    assert "plan: 1 window(s)" in capsys.readouterr().err

    chunked = fact_checksums(demo_url, schema="chunked")
    assert all(count > 0 for count, _ in chunked.values())
    assert chunked == fact_checksums(demo_url, schema="analytics")

    rows = audit_rows(demo_url)
    assert [(r["start_date"], r["end_date"], r["status"]) for r in rows] == [(start, end, "completed")] * 2
    assert rows[0]["records_processed"] == summary.rows


# ------------------------------------------------------------------ 4b. compiled windows

WEEK = ("--start-date", "2024-02-08", "--end-date", "2024-02-14", "--chunk", "day")


def _engine_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("engine: ")]


def test_compiled_windows_write_exactly_what_dbt_writes(
    demo_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = demo_url
    # An order that moves to another day of the range: delete+insert on the unique key must
    # drop it from its old day; a customer deleted upstream must disappear from its window.
    execute(url, "update raw.orders set ordered_at = ordered_at + interval '3 days' where tenant_id = 'tenant-002'"
            " and order_id = (select min(order_id) from raw.orders where tenant_id = 'tenant-002'"
            " and (ordered_at at time zone 'UTC')::date = '2024-02-09')")  # fmt: skip

    def both(*extra: str) -> tuple[list[WindowLine], list[WindowLine]]:
        monkeypatch.setenv("DBT_PG_SCHEMA", "per_window")
        assert run_cli(*WEEK, *extra, "--engine", "dbt", "--database-url", url) == 0
        err = capsys.readouterr().err
        assert _engine_lines(err) == ["engine: dbt per window: --engine dbt"]
        by_dbt, _ = report(err)
        monkeypatch.setenv("DBT_PG_SCHEMA", "compiled")
        assert run_cli(*WEEK, *extra, "--database-url", url) == 0
        err = capsys.readouterr().err
        assert _engine_lines(err)[-1] == "engine: compiled: dbt compiled 3 model(s) once; one transaction per window"
        compiled, _ = report(err)
        assert fact_checksums(url, schema="compiled") == fact_checksums(url, schema="per_window")
        return by_dbt, compiled

    by_dbt, compiled = both()
    assert [(w.label, w.status, w.rows) for w in compiled] == [(w.label, w.status, w.rows) for w in by_dbt]
    assert len(compiled) == 7 and all(w.rows > 0 for w in compiled)

    # Second round, tenant-scoped, after upstream changes for two tenants: tenant-002's change
    # lands, tenant-001's waits, identically in both engines.
    execute(url, "update raw.orders set amount = amount + 7 where (ordered_at at time zone 'UTC')::date"
            " between '2024-02-10' and '2024-02-11'")  # fmt: skip
    execute(url, "delete from raw.customers where tenant_id = 'tenant-002' and customer_id = (select max(customer_id)"
            " from raw.customers where tenant_id = 'tenant-002' and (created_at at time zone 'UTC')::date"
            " = '2024-02-12') and not exists (select 1 from raw.orders o where o.tenant_id = 'tenant-002'"
            " and o.customer_id = raw.customers.customer_id)")  # fmt: skip
    before = fact_checksums(url, schema="compiled", where="tenant_id <> 'tenant-002'")
    by_dbt, compiled = both("--tenant-id", "tenant-002")
    assert [w.rows for w in compiled] == [w.rows for w in by_dbt]
    assert fact_checksums(url, schema="compiled", where="tenant_id <> 'tenant-002'") == before
    revenue_sql = (
        "select sum(gross_revenue) from compiled.fact_daily_revenue"
        " where tenant_id = 'tenant-002' and order_date between '2024-02-10' and '2024-02-11'"
    )
    [(revenue,)] = query(url, revenue_sql)
    [(raw,)] = query(url, "select sum(amount) from raw.orders where tenant_id = 'tenant-002'"
                     " and (ordered_at at time zone 'UTC')::date between '2024-02-10' and '2024-02-11'")  # fmt: skip
    assert revenue == raw


def test_dbt_backfill_timings_prints_one_json_line_of_the_runs_phases(
    demo_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run_cli(*WEEK, "--database-url", demo_url) == 0  # tables created: the next run is compiled
    assert "dbt_backfill_timings" not in capsys.readouterr().err  # off unless asked for

    monkeypatch.setenv("DBT_BACKFILL_TIMINGS", "1")
    before = datetime.now(UTC).timestamp()
    assert run_cli(*WEEK, "--database-url", demo_url) == 0
    after = datetime.now(UTC).timestamp()
    lines = capsys.readouterr().err.splitlines()
    timed = [line for line in lines if "dbt_backfill_timings" in line]
    assert timed == [lines[-1]]  # one line, the last one: after the summary
    got = json.loads(timed[0])["dbt_backfill_timings"]
    names = ["main", "connected", "dbt_imported", "parsed", "planned", "audit_started", "engine", "windows", "closed"]
    assert list(got["marks_unix"]) == ["process_start", *names]
    assert list(got["phases_seconds"]) == list(got["phases_cpu_seconds"]) == names
    stamps = list(got["marks_unix"].values())
    assert stamps == sorted(stamps)
    assert stamps[0] < before <= stamps[1] and stamps[-1] <= after  # this (pytest's) process started earlier
    assert all(seconds >= 0 for seconds in [*got["phases_seconds"].values(), *got["phases_cpu_seconds"].values()])


def test_a_row_that_moved_out_of_its_window_is_replaced_compiled(
    demo_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Built once, then an order moves from 2024-02-09 to 2024-02-12 upstream. Rebuilding only
    # the 12th must take the order's key from the 9th (delete on the unique key) before it
    # inserts it again: the unique index on (tenant_id, order_id) holds throughout.
    url = demo_url
    assert run_cli(*WEEK, "--database-url", url) == 0
    [(order_id,)] = query(url, "select min(order_id) from raw.orders where tenant_id = 'tenant-001'"
                          " and (ordered_at at time zone 'UTC')::date = '2024-02-09'")  # fmt: skip
    execute(url, "update raw.orders set ordered_at = ordered_at + interval '3 days'"
            " where tenant_id = 'tenant-001' and order_id = %s", order_id)  # fmt: skip
    capsys.readouterr()

    for _ in range(2):  # and again, overlapping the same window: still one row per key
        assert run_cli("--start-date", "2024-02-12", "--end-date", "2024-02-12", "--database-url", url) == 0
        err = capsys.readouterr().err
        assert _engine_lines(err) == ["engine: compiled: dbt compiled 3 model(s) once; one transaction per window"]
        moved = query(url, "select order_date from analytics.fact_orders where tenant_id = 'tenant-001'"
                      " and order_id = %s", order_id)  # fmt: skip
        assert moved == [(date(2024, 2, 12),)]
    assert audit_rows(url)[-1]["status"] == "completed"


FRAGILE_MODEL_SQL = """\
{{ config(materialized='incremental', incremental_strategy='delete+insert', unique_key=['tenant_id', 'order_id'],
          pre_hook="{{ backfill_delete_window('ordered_at') }}") }}
-- Follows the backfill contract, and fails for the orders of 2024-02-10 only. The "%" must reach
-- the server as written (no client-side placeholder parsing), or nothing here runs compiled.
select tenant_id, order_id, ordered_at,
       1 / (case when (ordered_at at time zone 'UTC')::date = date '2024-02-10' then 0 else 1 end) as ok
from {{ source('raw', 'orders') }}
where status not like '%never%'
  {{ backfill_date_range(var('backfill_start_date'), var('backfill_end_date'), var('tenant_id'),
                         date_column='ordered_at') }}
"""


@pytest.fixture
def fragile_project(tmp_path: Path, cli_env: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A copy of analytics/ with one more contract model, which fails on one day; yields its name."""
    project_with_model(tmp_path, cli_env, monkeypatch, "zz_fragile", FRAGILE_MODEL_SQL)
    return "zz_fragile"


def test_a_failing_compiled_window_rolls_back_all_its_models(
    demo_url: str, fragile_project: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = demo_url
    assert run_cli("--start-date", "2024-02-08", "--end-date", "2024-02-08", "--database-url", url) == 0
    capsys.readouterr()  # the tables exist now: every window of the next run is compiled

    assert run_cli("--start-date", "2024-02-09", "--end-date", "2024-02-12", "--chunk", "day",
                   "--database-url", url) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert _engine_lines(err) == ["engine: compiled: dbt compiled 4 model(s) once; one transaction per window"]
    windows, summary = report(err)
    assert [(w.label, w.status) for w in windows] == [
        ("2024-02-09..2024-02-09", "ok"),
        ("2024-02-10..2024-02-10", "FAILED"),
    ]
    assert "error: zz_fragile: division by zero" in err.splitlines()
    assert (summary.verdict, summary.not_attempted) == ("FAILED", 2)
    row = audit_rows(url)[-1]
    assert (row["status"], row["error_message"]) == (
        "failed",
        "window 2024-02-10..2024-02-10: zz_fragile: division by zero",
    )

    # fact_orders ran before zz_fragile in the failed window, and was rolled back with it.
    days = "select distinct order_date from analytics.fact_orders order by 1"
    assert [d for (d,) in query(url, days)] == [date(2024, 2, 8), date(2024, 2, 9)]
    [(fragile,)] = query(url, "select count(*) from analytics.zz_fragile where ordered_at >= '2024-02-10'")
    assert fragile == 0


def test_a_statement_the_server_rejects_hands_the_windows_back_to_dbt(
    demo_url: str, fragile_project: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = demo_url
    assert run_cli("--start-date", "2024-02-08", "--end-date", "2024-02-08", "--database-url", url) == 0
    # A unique key the model does not produce: the table exists, but delete+insert cannot work.
    model = Path(os.environ["DBT_PROJECT_DIR"]) / "models" / "facts" / f"{fragile_project}.sql"
    model.write_text(
        model.read_text().replace("unique_key=['tenant_id', 'order_id']", "unique_key=['tenant_id', 'nope']")
    )
    capsys.readouterr()

    assert run_cli("--start-date", "2024-02-08", "--end-date", "2024-02-09", "--chunk", "day",
                   "--database-url", url) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert _engine_lines(err) == [
        'engine: dbt per window: the compiled models could not be prepared: column "nope" does not exist'
    ]
    assert f"error: {fragile_project}: " in err  # dbt's own run of the window fails on it too


def test_a_schema_change_hands_the_windows_back_to_dbt(demo_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    url = demo_url
    assert run_cli("--start-date", "2024-02-08", "--end-date", "2024-02-08", "--database-url", url) == 0
    execute(url, "alter table analytics.fact_customers add column note text")
    capsys.readouterr()

    assert run_cli("--start-date", "2024-02-09", "--end-date", "2024-02-10", "--chunk", "day",
                   "--database-url", url) == 1  # fmt: skip
    err = capsys.readouterr().err
    [engine] = _engine_lines(err)
    assert engine.startswith("engine: dbt per window: model fact_customers's columns differ from ")
    assert engine.endswith('."analytics"."fact_customers" (gone note)')
    # dbt applies the project's on_schema_change: fail.
    assert "out of sync" in err
    assert report(err)[1].verdict == "FAILED"


# ------------------------------------------------------------------ 5. a failing model

BROKEN_MODEL_SQL = """\
{{ config(materialized='table') }}
-- Deliberately broken: fails at run time in every window.
select 1 / 0 as x
from (select timestamptz '2024-02-02 12:00:00+00' as created_at, 'tenant-001'::text as tenant_id) as s
where 1=1
  {{ backfill_date_range(var('backfill_start_date'), var('backfill_end_date'), var('tenant_id')) }}
"""


@pytest.fixture
def broken_project(tmp_path: Path, cli_env: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A copy of analytics/ with one extra, failing fact model; yields the model's name.

    A copy, not a file in the checkout's analytics/models/: others run dbt on this checkout
    concurrently, and a stray model there would break their runs (and partial parsing).
    """
    name = f"zz_broken_{uuid.uuid4().hex[:8]}"
    model = project_with_model(tmp_path, cli_env, monkeypatch, name, BROKEN_MODEL_SQL)
    try:
        yield name
    finally:
        model.unlink(missing_ok=True)


def test_a_failing_model_fails_the_run_names_the_window_and_records_dbts_error(
    demo_url: str, broken_project: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(*FEB, "--chunk", "week", "--database-url", demo_url) == 1

    err = capsys.readouterr().err
    target, plan = err.splitlines()[:2]  # the target the data goes to, then the plan
    assert target.startswith("target: postgres ") and target.endswith("/analytics/profiles.yml)")
    assert plan.startswith("plan: ") and broken_project in plan  # the plan lists the model
    # A table model is outside the backfill contract: every window is a dbt run.
    assert f"engine: dbt per window: model {broken_project} is materialized as table" in err
    windows, summary = report(err)
    assert [(w.label, w.status) for w in windows] == [("2024-02-01..2024-02-04", "FAILED")]
    # dbt's message follows the window's line: the failing model, then the database's error.
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1
    assert error_lines[0].startswith(f"error: {broken_project}: ")
    assert "division by zero" in err.split(error_lines[0], 1)[1]
    # The first failure stops the backfill: later windows are reported as not attempted.
    assert (summary.verdict, summary.done, summary.planned, summary.not_attempted) == ("FAILED", 1, 5, 4)

    [row] = audit_rows(demo_url)
    assert row["id"] == summary.execution_id
    assert row["status"] == "failed"
    assert "division by zero" in row["error_message"]
    assert row["error_message"].startswith(f"window 2024-02-01..2024-02-04: {broken_project}: ")
    assert row["duration_seconds"] > 0
    assert row["finished_at"] is not None
    assert (row["start_date"], row["end_date"]) == (FEB_START, FEB_END)

    # The healthy models of the failed window ran; no later window did.
    for table in FACTS:
        _, high, _ = window_days(demo_url, table)
        assert high is not None and high <= date(2024, 2, 4), table


# ------------------------------------------------------------------ 6. bad input

UNREACHABLE = "postgresql://postgres@127.0.0.1:1/x"

BAD_INPUTS = [
    pytest.param(
        ["--start-date", "2024-02-10", "--end-date", "2024-02-01"],
        "pristine",
        "start_date must be <= end_date",
        id="reversed-dates",
    ),
    pytest.param(
        ["--start-date", "2024-02-30", "--end-date", "2024-03-01"], "pristine", "2024-02-30", id="february-30"
    ),
    pytest.param(["--start-date", "2024/01/01", "--end-date", "2024-01-31"], "pristine", "YYYY-MM-DD", id="slashes"),
    pytest.param(["--start-date", "2024-01-01", "--end-date", "20240131"], "pristine", "YYYY-MM-DD", id="no-dashes"),
    pytest.param([*FEB, "--tenant-id", ""], "pristine", "tenant_id must match", id="empty-tenant"),
    pytest.param([*FEB, "--tenant-id", "x' or '1'='1"], "pristine", "tenant_id must match", id="tenant-quotes"),
    pytest.param(
        [*FEB, "--tenant-id", "tenant-001;drop table raw.orders"],
        "pristine",
        "tenant_id must match",
        id="tenant-semicolon",
    ),
    pytest.param([*FEB, "--tenant-id", "tenant 001"], "pristine", "tenant_id must match", id="tenant-space"),
    pytest.param([*FEB, "--models", "does_not_exist"], "pristine", "selection matched no models", id="unknown-model"),
    pytest.param(
        [*FEB, "--models", "fact_orders", "fact_ordrs", "staging+"],
        "pristine",
        "selection matched no models: --models fact_ordrs matches nothing",
        id="one-selector-of-three-matches-nothing",
    ),
    pytest.param([*FEB, "--models", "fact_orders;drop"], "pristine", "selectors never use", id="selector-semicolon"),
    pytest.param([*FEB], UNREACHABLE, "cannot connect", id="unreachable-database"),
    pytest.param([*FEB], "mysql://root@127.0.0.1/x", "postgresql://", id="not-postgres"),
    pytest.param([*FEB], None, "DATABASE_URL", id="no-database-url"),
    pytest.param([*FEB, "--chunk", "week", "--chunk-size", "0"], "pristine", "chunk size", id="chunk-size-0"),
    # --chunk-size without --chunk must not be ignored silently (a fresh database: if it runs, it writes).
    pytest.param([*FEB, "--chunk-size", "0"], "fresh", "chunk", id="chunk-size-0-without-chunk"),
    pytest.param([*FEB, "--chunk", "year"], "pristine", "invalid choice: 'year'", id="chunk-year"),
    pytest.param([*FEB, "--threads", "0"], "pristine", "--threads", id="threads-0"),
    pytest.param([*FEB, "--execution-id", "run-42"], "pristine", "--execution-id", id="execution-id-not-uuid"),
    pytest.param(["--end-date", "2024-02-01"], "pristine", "--start-date", id="missing-start-date"),
    # The last representable days: planning and the recent-data check must not overflow.
    *(
        pytest.param(
            ["--start-date", "9999-11-01", "--end-date", "9999-12-31", "--chunk", unit],
            "pristine",
            "--allow-recent",
            id=f"year-9999-{unit}",
        )
        for unit in ("day", "week", "month")
    ),
    pytest.param(
        ["--start-date", "2024-02-30", "--end-date", "2024-03-01"], "pristine", "start_date", id="no-such-day"
    ),
    pytest.param(
        ["--start-date", "10000-01-01", "--end-date", "10000-01-02"], "pristine", "start_date", id="year-10000"
    ),
    pytest.param([*FEB, "--engine", "fast"], "pristine", "invalid choice: 'fast'", id="unknown-engine"),
    pytest.param([*FEB], "postgresql://", "host and a database", id="url-without-host"),
    pytest.param([*FEB], "postgresql://u@h/db?nope=1", "invalid URI query parameter", id="url-unknown-parameter"),
]


@pytest.mark.parametrize(("argv", "database", "message"), BAD_INPUTS)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    argv: list[str],
    database: str | None,
    message: str,
    request: pytest.FixtureRequest,
    capfd: pytest.CaptureFixture[str],
) -> None:
    # "pristine" is the module's untouched demo database; "fresh" is demo data in a database of
    # this test's own; anything else is passed as --database-url verbatim (None: no URL at all).
    watched: str = request.getfixturevalue("demo_url" if database == "fresh" else "pristine_url")
    if database in ("pristine", "fresh"):
        argv = [*argv, "--database-url", watched]
    elif database is not None:
        argv = [*argv, "--database-url", database]
    before = db_state(watched)
    capfd.readouterr()

    assert run_cli(*argv) == 2

    out, err = capfd.readouterr()
    lines = nonempty_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith("run_dbt_backfill: error: "), lines[0]
    assert message in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert db_state(watched) == before
    assert not table_exists(watched, "public", "backfill_executions")
    assert not any(schema == "analytics" for schema, _ in before["tables"])


# ------------------------------------------------------------------ 7. recent windows


def test_a_window_ending_today_needs_allow_recent(database_url: str, capfd: pytest.CaptureFixture[str]) -> None:
    today = datetime.now(UTC).date()
    start = today - timedelta(days=2)
    url = load_demo(database_url, start_date=start, days=3)
    argv = ("--start-date", start.isoformat(), "--end-date", today.isoformat(), "--database-url", url)
    before = db_state(url)
    capfd.readouterr()

    assert run_cli(*argv) == 2
    lines = nonempty_lines(capfd.readouterr().err)
    assert len(lines) == 1, lines
    assert "--allow-recent" in lines[0] and today.isoformat() in lines[0]
    assert db_state(url) == before
    assert not table_exists(url, "public", "backfill_executions")

    assert run_cli(*argv, "--allow-recent") == 0
    [row] = audit_rows(url)
    assert (row["status"], row["end_date"]) == ("completed", today)
    assert window_days(url, "fact_orders")[1] == today
    capfd.readouterr()


# ------------------------------------------------------------------ 8. dry run


def test_dry_run_prints_every_window_compiles_and_writes_nothing(
    pristine_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = db_state(pristine_url)
    expected = planner.plan_windows(FEB_START, FEB_END, "week", 1)

    assert run_cli(*FEB, "--chunk", "week", "--dry-run", "--database-url", pristine_url) == 0

    err = capsys.readouterr().err
    assert f"plan: {len(expected)} window(s) 2024-02-01..2024-02-29, all tenants" in err
    for w in expected:
        assert f"  window {w.index + 1}: {w.label()} ({w.days} day(s))" in err
    assert re.search(r"^dry run: \d+ model\(s\) compiled for 2024-02-01\.\.2024-02-04; nothing written$", err, re.M)
    assert not _WINDOW_RE.search(err) and "backfill completed" not in err
    # Nothing was written: no audit table, no fact table.
    assert db_state(pristine_url) == before
    assert not table_exists(pristine_url, "public", "backfill_executions")
    for table in FACTS:
        assert not table_exists(pristine_url, "analytics", table)


def test_dry_run_reports_the_number_of_models_it_compiled(
    pristine_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The plan line counts the selected models; the dry-run line must count the same models,
    # not every node dbt compiled along with them (data tests included).
    assert run_cli(*FEB, "--dry-run", "--models", "fact_orders", "--database-url", pristine_url) == 0
    err = capsys.readouterr().err
    planned = re.search(r"^plan: .*, (\d+) model\(s\): (.*)$", err, re.M)
    compiled = re.search(r"^dry run: (\d+) model\(s\) compiled", err, re.M)
    assert planned and compiled, err
    assert planned[2] == "fact_orders"
    assert int(compiled[1]) == int(planned[1]) == 1, err


# ------------------------------------------------------------------ 9. --execution-id


def test_the_same_execution_id_updates_one_row(demo_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    execution_id = uuid.uuid4()
    argv = (*FEB, "--execution-id", str(execution_id), "--database-url", demo_url)

    assert run_cli(*argv) == 0
    [first] = audit_rows(demo_url)
    assert (first["id"], first["status"]) == (execution_id, "completed")
    # Pretend the first attempt had failed: the retry must overwrite that outcome.
    execute(
        demo_url,
        "update backfill_executions set status = 'failed', error_message = 'earlier attempt' where id = %s",
        execution_id,
    )

    assert run_cli(*argv) == 0
    assert f"(execution {execution_id})" in capsys.readouterr().err
    [second] = audit_rows(demo_url)
    assert second["id"] == execution_id
    assert (second["status"], second["error_message"]) == ("completed", None)
    assert second["created_at"] == first["created_at"]
    assert second["updated_at"] > first["updated_at"]
    assert second["finished_at"] > first["finished_at"]
    assert second["duration_seconds"] > 0
    assert second["records_processed"] == first["records_processed"] > 0


# ------------------------------------------------------------------ 10. history, db upgrade, the docs' SQL


def seed_history(url: str) -> list[tuple[uuid.UUID, str, str | None]]:
    """One completed, six failed and one running row, created a minute apart (oldest first)."""
    engine = audit.engine_for(register_url(url))
    audit.ensure_schema(engine)
    plan = [("completed", None), *(("failed", f"boom-{n}: division by zero") for n in range(1, 7)), ("running", None)]
    seeded = []
    base = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
    for minute, (status, error) in enumerate(plan):
        execution_id = uuid.uuid4()
        audit.record_start(
            engine,
            audit.ExecutionStart(
                id=execution_id,
                start_date=FEB_START,
                end_date=FEB_END,
                tenant_id="tenant-002" if status == "failed" else None,
                models=["fact_orders"],
            ),
        )
        if status != "running":
            audit.record_finish(
                engine, execution_id, status, duration_seconds=1.25, records_processed=42, error_message=error
            )
        execute(
            url,
            "update backfill_executions set created_at = %s where id = %s",
            base + timedelta(minutes=minute),
            execution_id,
        )
        seeded.append((execution_id, status, error))
    return seeded


def test_history_lists_rows_and_filters_by_status(
    database_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seed_history(database_url)
    monkeypatch.setenv("DATABASE_URL", register_url(database_url))  # the env var, no flag

    assert run_tool("history") == 0
    out = capsys.readouterr().out
    assert "backfill_executions" in out
    assert all(f"boom-{n}" in out for n in range(1, 7))
    assert " completed " in out and " running " in out

    assert run_tool("history", "--status", "failed", "--limit", "5") == 0
    out = capsys.readouterr().out
    # newest first: the five newest failures, none of the others
    assert [n for n in range(1, 7) if f"boom-{n}" in out] == [2, 3, 4, 5, 6]
    assert " completed " not in out and " running " not in out
    assert out.index("boom-6") < out.index("boom-2")


def test_history_prints_full_execution_ids(database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    # The ids are what people copy into --execution-id or SQL: they must not be folded.
    seeded = seed_history(database_url)
    assert run_tool("history", "--database-url", database_url) == 0
    out = capsys.readouterr().out
    missing = [str(execution_id) for execution_id, _, _ in seeded if str(execution_id) not in out]
    assert not missing, out


def test_history_on_an_unreachable_database_is_one_line(capfd: pytest.CaptureFixture[str]) -> None:
    assert run_tool("history", "--database-url", UNREACHABLE) == 2
    lines = nonempty_lines(capfd.readouterr().err)
    assert len(lines) == 1 and "cannot connect" in lines[0], lines


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["history", "--limit", "-1"], "argument --limit: must be 0 or more, got -1"),
        (["history", "--limit", "ten"], "argument --limit: must be a whole number"),
        (["history", "--status", "lost"], "invalid choice: 'lost'"),
        (["history", "--database-url", "mysql://root@h/x"], "must be a postgresql:// URL"),
        (["db", "upgrade", "--database-url", "postgresql://u@h/db?nope=1"], "invalid URI query parameter"),
    ],
    ids=["negative-limit", "limit-not-a-number", "unknown-status", "not-postgres", "bad-parameter"],
)
def test_history_and_db_upgrade_refuse_bad_input_in_one_line(
    database_url: str, argv: list[str], message: str, capfd: pytest.CaptureFixture[str]
) -> None:
    if "--database-url" not in argv:
        argv = [*argv, "--database-url", database_url]
    assert run_tool(*argv) == 2
    out, err = capfd.readouterr()
    lines = nonempty_lines(err)
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in out + err
    assert not table_exists(database_url, "public", "backfill_executions")


@pytest.fixture
def read_only_url(demo_url: str) -> str:
    """The demo database through a role that may read everything and create or write nothing."""
    role = f"reader_{uuid.uuid4().hex[:8]}"
    execute(demo_url, f"create role {role} login")
    execute(demo_url, f"grant usage on schema raw to {role}")
    execute(demo_url, f"grant select on all tables in schema raw to {role}")
    execute(demo_url, f"revoke create on schema public from public, {role}")
    return register_url(demo_url.replace("postgresql://postgres@", f"postgresql://{role}@", 1))


@pytest.mark.parametrize("audit_table", [False, True], ids=["no-audit-table", "audit-table-not-writable"])
def test_a_read_only_role_is_one_line_exit_2_and_nothing_written(
    demo_url: str, read_only_url: str, audit_table: bool, capfd: pytest.CaptureFixture[str]
) -> None:
    if audit_table:
        audit.ensure_schema(audit.engine_for(register_url(demo_url)))
    before = db_state(demo_url)
    capfd.readouterr()

    assert run_cli(*FEB, "--database-url", read_only_url) == 2
    out, err = capfd.readouterr()
    lines = nonempty_lines(err)
    # The target and plan lines, then the refusal, before any window.
    [error] = [line for line in lines if "error" in line.lower()]
    assert error == lines[-1], err
    assert error.startswith("run_dbt_backfill: error: cannot write the audit log backfill_executions: ")
    assert "permission denied" in error
    assert not any(line.startswith(("window ", "engine: ")) for line in lines), err
    assert "Traceback" not in out + err
    assert db_state(demo_url) == before

    # It may not even read the audit tables: history says so, in one line.
    assert run_tool("history", "--database-url", read_only_url) == 2
    out, err = capfd.readouterr()
    [line] = nonempty_lines(err)
    assert line.startswith("dbt-backfill history: error: the database refused: permission denied for "), err
    assert "Traceback" not in out + err


def test_db_upgrade_reports_the_revision(database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(Path(audit.__file__).parent / "migrations"))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head

    for _ in range(2):  # the second time is a no-op that reports the same revision
        assert run_tool("db", "upgrade", "--database-url", database_url) == 0
        assert capsys.readouterr().out.strip() == f"audit schema at revision {head}"
    assert table_exists(database_url, "public", "backfill_executions")
    assert query(database_url, sql.SQL("select version_num from {}").format(sql.Identifier(audit.VERSION_TABLE))) == [
        (head,)
    ]


def test_the_docs_sql_queries_run_as_written(database_url: str) -> None:
    seeded = seed_history(database_url)
    # Verbatim from the seed docs.
    recent = (
        "SELECT id, tenant_id, start_date, end_date, status, duration_seconds, created_at"
        " FROM backfill_executions ORDER BY created_at DESC LIMIT 10;"
    )
    failed = "SELECT * FROM backfill_executions WHERE status = 'failed' ORDER BY created_at DESC;"
    with psycopg.connect(database_url) as conn:
        cur = conn.execute(recent)
        assert [c.name for c in cur.description or ()] == [
            "id",
            "tenant_id",
            "start_date",
            "end_date",
            "status",
            "duration_seconds",
            "created_at",
        ]
        rows = cur.fetchall()
        assert [r[0] for r in rows] == [execution_id for execution_id, _, _ in reversed(seeded)]
        assert rows[0][4] == "running" and rows[-1][4] == "completed"

        cur = conn.execute(failed)
        names = [c.name for c in cur.description or ()]
        rows = cur.fetchall()
    assert {"id", "status", "error_message", "duration_seconds", "records_processed", "created_at"} <= set(names)
    by_name = [dict(zip(names, r, strict=True)) for r in rows]
    assert [r["id"] for r in by_name] == [i for i, status, _ in reversed(seeded) if status == "failed"]
    assert all(r["status"] == "failed" and "division by zero" in r["error_message"] for r in by_name)


# ------------------------------------------------------------------ the real entry point


def test_python_m_scripts_run_dbt_backfill(demo_url: str, cli_env: Path) -> None:
    # As the operator's Jobs run it: URL from the environment, ids on the command line. The
    # module's project copy and target dir (for its partial parse) stand in for the image's.
    execution_id, parent_id = uuid.uuid4(), uuid.uuid4()
    env = runner_env(demo_url, cli_env)
    command = [sys.executable, "-m", "scripts.run_dbt_backfill"]
    argv = [
        "--start-date", "2024-02-05", "--end-date", "2024-02-18", "--tenant-id", "tenant-002", "--chunk", "week",
        "--execution-id", str(execution_id), "--parent-id", str(parent_id),
    ]  # fmt: skip
    run = subprocess.run(
        [*command, *argv],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "plan: 2 window(s) 2024-02-05..2024-02-18, tenant tenant-002" in run.stderr
    windows, summary = report(run.stderr)
    assert [(w.label, w.status) for w in windows] == [
        ("2024-02-05..2024-02-11", "ok"),
        ("2024-02-12..2024-02-18", "ok"),
    ]
    assert (summary.verdict, summary.done, summary.execution_id) == ("completed", 2, execution_id)
    assert "Traceback" not in run.stdout + run.stderr

    [row] = audit_rows(demo_url)
    assert (row["id"], row["parent_id"], row["kind"]) == (execution_id, parent_id, "chunk")
    assert (row["tenant_id"], row["status"], row["records_processed"]) == ("tenant-002", "completed", summary.rows)
    assert query(demo_url, "select distinct tenant_id from analytics.fact_orders") == [("tenant-002",)]
    assert window_days(demo_url, "fact_orders")[:2] == (date(2024, 2, 5), date(2024, 2, 18))

    bad = subprocess.run(
        [*command, "--start-date", "2024-02-18", "--end-date", "2024-02-05"],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 2
    assert nonempty_lines(bad.stderr) == ["run_dbt_backfill: error: start_date must be <= end_date"]
    assert len(audit_rows(demo_url)) == 1
