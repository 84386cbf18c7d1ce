"""The ``analytics`` dbt project against a real PostgreSQL, with real dbt run in-process.

dbt is driven the way the runner drives it (parse once, then one ``run`` per window with
``--vars`` on the parsed manifest) and the way a person would (plain ``dbt run --vars``,
which parses with the vars). Expectations are computed in Python from the raw rows, not
with the project's own macro.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from dbt.cli.main import dbtRunner, dbtRunnerResult
from psycopg import sql
from sqlalchemy.engine import make_url

from dbtbackfill.demo.data import CUSTOMER_LOOKBACK_DAYS, load_demo_data
from dbtbackfill.runner.project import install_packages, read_project

pytestmark = pytest.mark.integration

PROJECT_DIR = Path(__file__).resolve().parents[2] / "analytics"
FACTS = ("fact_customers", "fact_daily_revenue", "fact_orders")
# The UTC day each fact is windowed on.
WINDOW_DAY = {
    "fact_customers": "(created_at at time zone 'UTC')::date",
    "fact_daily_revenue": "order_date",
    "fact_orders": "(ordered_at at time zone 'UTC')::date",
}
START = date(2024, 3, 1)
DAYS = 14
TENANTS = 2
ROWS_PER_DAY = 6
# Every raw row: the demo loads customers from START - lookback, orders from START.
FIRST_DAY = START - timedelta(days=CUSTOMER_LOOKBACK_DAYS)
LAST_DAY = START + timedelta(days=DAYS - 1)

Vars = dict[str, str | None]


def window(start: str | None = None, end: str | None = None, tenant: str | None = None) -> Vars:
    return {"backfill_start_date": start, "backfill_end_date": end, "tenant_id": tenant}


class Project:
    """dbt on one database and target schema."""

    def __init__(self, url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, schema: str = "analytics") -> None:
        parsed = make_url(url)
        self.url = url
        self.schema = schema
        self.env = {
            "DBT_PG_HOST": parsed.host or "127.0.0.1",
            "DBT_PG_PORT": str(parsed.port or 5432),
            "DBT_PG_USER": parsed.username or "postgres",
            "DBT_PG_PASSWORD": parsed.password or "",
            "DBT_PG_DBNAME": parsed.database or "",
            "DBT_PG_SCHEMA": schema,
            "DBT_THREADS": "4",
        }
        self.monkeypatch = monkeypatch
        self.paths = [
            "--project-dir", str(PROJECT_DIR),
            "--profiles-dir", str(PROJECT_DIR),
            "--target-path", str(tmp_path / f"target-{schema}"),
            "--log-path", str(tmp_path / f"logs-{schema}"),
        ]  # fmt: skip
        self.manifest: Any = None

    def invoke(
        self,
        command: str,
        *args: str,
        vars: Vars | None = None,
        parsed: bool = False,
        events: list[Any] | None = None,
    ) -> dbtRunnerResult:
        """Invoke dbt; ``parsed=True`` reuses the manifest of :meth:`parse`, like the runner.

        Each invocation gets its own copy: dbt marks the nodes of the manifest it is given as
        compiled (ephemeral CTEs injected), and a second run on the same object then skips the
        CTEs (``relation "__dbt__cte__stg_orders" does not exist``) or reuses an ephemeral
        model compiled with the previous window's vars.
        """
        for key, value in self.env.items():
            self.monkeypatch.setenv(key, value)
        # No dbt.log: dbt drops its file handler unclosed on the next in-process invocation,
        # and pytest turns that ResourceWarning into an error. Events come via callbacks.
        argv = ["--quiet", "--no-use-colors", "--log-level-file", "none", command, *self.paths, *args]
        if vars is not None:
            argv += ["--vars", json.dumps(vars)]
        callbacks: list[Callable[[Any], None]] = [events.append] if events is not None else []
        if parsed:
            assert self.manifest is not None, "parse() first"
            return dbtRunner(manifest=self.manifest.deepcopy(), callbacks=callbacks).invoke(argv)
        return dbtRunner(callbacks=callbacks).invoke(argv)

    def parse(self) -> None:
        res = self.invoke("parse")
        assert res.success, res.exception
        self.manifest = res.result

    def run(self, vars: Vars | None = None, *args: str, parsed: bool = True) -> dbtRunnerResult:
        parsed = parsed and self.manifest is not None
        res = self.invoke("run", "--no-write-json", *args, vars=vars, parsed=parsed)
        assert res.success, (res.exception, statuses(res))
        assert sorted(statuses(res)) == list(FACTS)
        assert set(statuses(res).values()) == {"success"}
        return res

    def tables(self) -> list[str]:
        return [
            row[0]
            for row in query(
                self.url,
                "select table_name from information_schema.tables where table_schema = %s order by 1",
                self.schema,
            )
        ]

    def checksums(self, where: dict[str, str] | None = None) -> dict[str, tuple[int, str]]:
        """Row count and an order-independent md5 of every fact's rows (optionally filtered)."""
        out = {}
        for table in FACTS:
            stmt = sql.SQL(
                "select count(*), coalesce(md5(string_agg(t::text, '|' order by t::text)), '') from {}.{} t where {}"
            ).format(sql.Identifier(self.schema), sql.Identifier(table), sql.SQL((where or {}).get(table, "true")))
            [(count, digest)] = query(self.url, stmt)
            out[table] = (count, digest)
        return out

    def keys(self, table: str, *columns: str) -> set[tuple[Any, ...]]:
        stmt = sql.SQL("select {} from {}.{}").format(
            sql.SQL(", ").join(sql.Identifier(c) for c in columns),
            sql.Identifier(self.schema),
            sql.Identifier(table),
        )
        return set(query(self.url, stmt))


def query(url: str, stmt: Any, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(stmt, params).fetchall()


def execute(url: str, stmt: Any, *params: Any) -> None:
    with psycopg.connect(url) as conn:
        conn.execute(stmt, params)


def statuses(res: dbtRunnerResult) -> dict[str, str]:
    results = getattr(res.result, "results", None) or []
    return {r.node.name: str(r.status) for r in results}


def utc_day(ts: datetime) -> date:
    return ts.astimezone(UTC).date()


def selected(rows: Iterable[tuple[Any, ...]], vars: Vars, ts_index: int) -> set[tuple[Any, ...]]:
    """The rows a window keeps, computed in Python: tenant is column 0, UTC day of ts_index."""
    start, end, tenant = vars["backfill_start_date"], vars["backfill_end_date"], vars["tenant_id"]
    out = set()
    for row in rows:
        day = utc_day(row[ts_index]) if isinstance(row[ts_index], datetime) else row[ts_index]
        if start and end and not date.fromisoformat(start) <= day <= date.fromisoformat(end):
            continue
        if tenant and row[0] != tenant:
            continue
        out.add(row)
    return out


@pytest.fixture(scope="module", autouse=True)
def installed_packages() -> None:
    """``dbt deps`` for the checkout's analytics/ (its packages.yml installs ../dbt-package), as the runner does."""
    install_packages(read_project(PROJECT_DIR))
    assert (PROJECT_DIR / "dbt_packages" / "dbt_backfill" / "macros" / "backfill.sql").is_file()


@pytest.fixture
def project(database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Project:
    """Demo data (2 tenants x 14 days) in a fresh database, and dbt pointed at it."""
    load_demo_data(database_url, tenants=TENANTS, start_date=START, days=DAYS, rows_per_day=ROWS_PER_DAY)
    return Project(database_url, tmp_path, monkeypatch)


@pytest.mark.parametrize(
    "vars",
    [
        pytest.param(window(), id="nulls-filter-nothing"),
        pytest.param(window("", "", ""), id="empty-strings-filter-nothing"),
        pytest.param(window("2024-03-04", "2024-03-06"), id="dates-only"),
        pytest.param(window(tenant="tenant-002"), id="tenant-only"),
        pytest.param(window("2024-03-04", "2024-03-06", "tenant-002"), id="dates-and-tenant"),
        pytest.param(window("2024-03-05", "2024-03-05", "tenant-001"), id="one-day"),
    ],
)
def test_first_run_loads_exactly_the_window_and_tenant(project: Project, vars: Vars) -> None:
    # A session time zone far from UTC: windows and days must still be UTC days.
    dbname = make_url(project.url).database
    execute(project.url, f"alter database \"{dbname}\" set timezone to 'Pacific/Kiritimati'")

    project.run(vars, parsed=False)

    orders = query(project.url, "select tenant_id, order_id, customer_id, ordered_at from raw.orders")
    customers = query(project.url, "select tenant_id, customer_id, created_at from raw.customers")
    want_orders = selected(orders, vars, 3)
    want_customers = selected(customers, vars, 2)
    assert want_orders, "the case must select something"
    assert project.keys("fact_orders", "tenant_id", "order_id", "customer_id", "ordered_at") == want_orders
    assert project.keys("fact_customers", "tenant_id", "customer_id", "created_at") == want_customers
    want_days: dict[tuple[str, date], int] = {}
    for tenant, _, _, ordered_at in want_orders:
        key = (tenant, utc_day(ordered_at))
        want_days[key] = want_days.get(key, 0) + 1
    daily = project.keys("fact_daily_revenue", "tenant_id", "order_date", "order_count")
    assert {(t, d): n for t, d, n in daily} == want_days
    # the end date is inclusive: its late orders are in, nothing of the next day is
    if vars["backfill_end_date"]:
        end = date.fromisoformat(vars["backfill_end_date"])
        assert max(utc_day(row[3]) for row in want_orders) == end
        [(latest,)] = query(project.url, "select max(ordered_at) from analytics.fact_orders")
        assert latest.astimezone(UTC).hour >= 18


BAD_VARS = [
    (window("2024-02-30", "2024-03-05"), "backfill_start_date is not a real date"),
    (window("2023-02-29", "2023-03-05"), "backfill_start_date is not a real date"),
    (window("2024-03-01", "2024-13-01"), "backfill_end_date is not a real date"),
    (window("2024-03-01", "03/05/2024"), "backfill_end_date must be a date formatted YYYY-MM-DD"),
    (window("2024-3-1", "2024-03-05"), "backfill_start_date must be a date formatted YYYY-MM-DD"),
    (window("2024-03-01'::date or true --", "2024-03-05"), "must be a date formatted YYYY-MM-DD"),
    (window("\u0662\u0660\u0662\u0664-03-01", "2024-03-05"), "must be a date formatted YYYY-MM-DD"),
    (window("2024-03-01\n", "2024-03-05"), "must be a date formatted YYYY-MM-DD"),
    (window(tenant="x' or '1'='1"), "tenant_id must match"),
    (window(tenant="tenant-001\n"), "tenant_id must match"),
    (window(tenant="-tenant"), "tenant_id must match"),
    (window(tenant="t" * 64), "tenant_id must match"),
    (window("2024-03-01"), "both backfill_start_date and backfill_end_date are required for a date filter"),
    (
        window(end="2024-03-01"),
        "both backfill_start_date and backfill_end_date are required for a date filter",
    ),
    (
        window("2024-03-06", "2024-03-05"),
        "backfill_start_date 2024-03-06 is after backfill_end_date 2024-03-05",
    ),
]


def test_bad_vars_are_compile_errors_and_write_nothing(project: Project) -> None:
    # dbt run --vars ...: the project is parsed with the vars and fails before any model runs.
    # (A parse with new vars takes about a second, so only some of the cases go this way.)
    for vars, message in BAD_VARS[::4]:
        res = project.invoke("run", vars=vars)
        assert not res.success, vars
        assert message in str(res.exception), (vars, res.exception)
        assert project.tables() == [], vars

    # the runner's way: parsed once, run with the vars. Existing tables stay as they are.
    project.parse()
    project.run(window())
    before = project.checksums()
    for vars, message in BAD_VARS:
        events: list[Any] = []
        res = project.invoke("run", vars=vars, parsed=True, events=events)
        assert not res.success, vars
        assert statuses(res) and "success" not in statuses(res).values(), (vars, statuses(res))
        # the fact nodes only say an ephemeral model failed; the reason is in dbt's events
        assert any(message in e.info.msg for e in events), (vars, [e.info.msg for e in events])
        assert project.checksums() == before, vars


def test_yaml_dates_on_the_command_line_are_accepted(project: Project) -> None:
    # `--vars '{backfill_start_date: 2024-03-04, ...}'` is YAML: the dates arrive as date objects
    for key, value in project.env.items():
        project.monkeypatch.setenv(key, value)
    res = dbtRunner().invoke(
        [
            "--quiet",
            "run",
            *project.paths,
            "--vars",
            "{backfill_start_date: 2024-03-04, backfill_end_date: 2024-03-04}",
        ]
    )
    assert res.success, res.exception
    [(days,)] = query(project.url, 'select array_agg(distinct order_date) from "analytics".fact_orders')
    assert days == [date(2024, 3, 4)]


def test_full_refresh_with_a_window_is_refused(project: Project) -> None:
    project.parse()
    project.run(window("2024-03-01", "2024-03-14"))
    before = project.checksums()
    for vars in (window("2024-03-04", "2024-03-06"), window(tenant="tenant-001")):
        events: list[Any] = []
        res = project.invoke("run", "--full-refresh", vars=vars, parsed=True, events=events)
        assert not res.success
        assert any("--full-refresh rebuilds whole tables" in e.info.msg for e in events)
        assert project.checksums() == before
    res = project.invoke("run", "--full-refresh", vars=window(tenant="tenant-001"))
    assert "--full-refresh rebuilds whole tables" in str(res.exception)
    # a full refresh without a window rebuilds everything
    project.run(window(), "--full-refresh")
    assert project.checksums()["fact_orders"][0] == TENANTS * DAYS * ROWS_PER_DAY


def test_rerunning_a_window_replaces_exactly_that_window(project: Project) -> None:
    project.parse()
    project.run(window())
    full = project.checksums()
    w = window("2024-03-05", "2024-03-08")
    outside = {t: f"{day} not between '2024-03-05' and '2024-03-08'" for t, day in WINDOW_DAY.items()}

    # unchanged raw data: re-running a window is byte-identical
    project.run(w)
    assert project.checksums() == full

    # change raw rows inside and outside the window
    def pick(sql_text: str) -> tuple[Any, ...]:
        [row] = query(project.url, sql_text + " order by 1, 2 limit 1")
        return row

    gone = pick(
        "select tenant_id, order_id, ordered_at from raw.orders where tenant_id = 'tenant-001'"
        " and ordered_at >= '2024-03-06 00:00+00' and ordered_at < '2024-03-07 00:00+00'"
    )
    changed = pick(
        "select tenant_id, order_id from raw.orders where tenant_id = 'tenant-002'"
        " and ordered_at >= '2024-03-08 00:00+00' and ordered_at < '2024-03-09 00:00+00'"
    )
    kept = pick("select tenant_id, order_id from raw.orders where ordered_at >= '2024-03-12 00:00+00'")
    lost_customer = pick(
        "select tenant_id, customer_id from raw.customers where tenant_id = 'tenant-002'"
        " and created_at >= '2024-03-05 00:00+00' and created_at < '2024-03-06 00:00+00'"
    )
    other_tenant = pick(
        "select tenant_id, order_id from raw.orders where tenant_id = 'tenant-002'"
        " and ordered_at >= '2024-03-05 00:00+00' and ordered_at < '2024-03-06 00:00+00'"
    )
    execute(project.url, "delete from raw.orders where tenant_id = %s and order_id = %s", *gone[:2])
    execute(project.url, "update raw.orders set amount = 9999.99 where tenant_id = %s and order_id = %s", *changed)
    execute(project.url, "delete from raw.orders where tenant_id = %s and order_id = %s", *kept)
    execute(project.url, "delete from raw.customers where tenant_id = %s and customer_id = %s", *lost_customer)
    [(day_count_before,)] = query(
        project.url,
        "select order_count from analytics.fact_daily_revenue where tenant_id = %s and order_date = %s",
        gone[0],
        utc_day(gone[2]),
    )

    outside_before = project.checksums(outside)
    project.run(w)

    orders = project.keys("fact_orders", "tenant_id", "order_id")
    assert gone[:2] not in orders
    assert kept in orders, "outside the window nothing is touched, not even a row gone upstream"
    assert lost_customer not in project.keys("fact_customers", "tenant_id", "customer_id")
    [(amount,)] = query(
        project.url,
        "select amount from analytics.fact_orders where tenant_id = %s and order_id = %s",
        *changed,
    )
    assert str(amount) == "9999.99"
    [(day_count_after,)] = query(
        project.url,
        "select order_count from analytics.fact_daily_revenue where tenant_id = %s and order_date = %s",
        gone[0],
        utc_day(gone[2]),
    )
    assert day_count_after == day_count_before - 1
    assert project.checksums(outside) == outside_before
    # and a second run of the same window changes nothing
    after = project.checksums()
    project.run(w)
    assert project.checksums() == after

    # a tenant-scoped run replaces only that tenant's rows of the window
    execute(project.url, "delete from raw.orders where tenant_id = %s and order_id = %s", *other_tenant)
    project.run(window("2024-03-05", "2024-03-08", "tenant-001"))
    assert other_tenant in project.keys("fact_orders", "tenant_id", "order_id")
    assert project.checksums() == after
    project.run(window("2024-03-05", "2024-03-08", "tenant-002"))
    assert other_tenant not in project.keys("fact_orders", "tenant_id", "order_id")


def chunks(first: date, last: date, days: int) -> Sequence[Vars]:
    out = []
    start = first
    while start <= last:
        end = min(last, start + timedelta(days=days - 1))
        out.append(window(start.isoformat(), end.isoformat()))
        start = end + timedelta(days=1)
    return out


def test_chunked_backfill_equals_a_full_build_and_dbt_test_passes(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    load_demo_data(database_url, tenants=TENANTS, start_date=START, days=DAYS, rows_per_day=ROWS_PER_DAY)
    whole = Project(database_url, tmp_path, monkeypatch, schema="whole")
    whole.run(None, parsed=False)  # plain `dbt run`, no vars, no selection: the project defaults

    chunked = Project(database_url, tmp_path, monkeypatch, schema="chunked")
    chunked.parse()
    for vars in chunks(FIRST_DAY, LAST_DAY, 6):  # the first chunk creates the tables
        chunked.run(vars, "--select", "staging+", "facts+")
    assert chunked.checksums() == whole.checksums()
    assert chunked.checksums()["fact_orders"][0] == TENANTS * DAYS * ROWS_PER_DAY

    res = chunked.invoke("test", parsed=True)
    assert res.success, statuses(res)
    assert len(statuses(res)) > 20
    assert set(statuses(res).values()) == {"pass"}

    # the tests bite: an order of an unknown customer, and a duplicated fact row
    execute(
        database_url,
        "insert into raw.orders values ('tenant-001', 1, 424242, 'placed', 1.00, '2024-03-02 10:00+00')",
    )
    # The fact's unique index refuses a duplicate outright ...
    with pytest.raises(psycopg.errors.UniqueViolation):
        execute(database_url, "insert into chunked.fact_orders select * from chunked.fact_orders limit 1")
    # ... and where it is gone (a table built before it existed), the data test still catches one.
    [(unique_index,)] = query(
        database_url,
        "select indexname from pg_indexes where schemaname = 'chunked' and tablename = 'fact_orders'"
        " and indexdef like 'CREATE UNIQUE INDEX%%'",
    )
    execute(database_url, sql.SQL("drop index chunked.{}").format(sql.Identifier(unique_index)))
    execute(database_url, "insert into chunked.fact_orders select * from chunked.fact_orders limit 1")
    res = chunked.invoke("test", parsed=True)
    assert not res.success
    failed = sorted(name for name, status in statuses(res).items() if status == "fail")
    assert any(name.startswith("source_relationships_combination_raw_orders") for name in failed), failed
    assert any(name.startswith("source_relationships_raw_orders_customer_id") for name in failed), failed
    assert any(name.startswith("unique_combination_fact_orders") for name in failed), failed
