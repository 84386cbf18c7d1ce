"""The compiled engine, the dbt engine and a from-scratch build agree, whatever the sources did.

A differential property test on real PostgreSQL and real dbt: hypothesis generates upstream
churn on ``raw.*`` (orders and customers that move to another day or another tenant, deletes,
updates, inserts) and backfill runs over it (overlapping windows, tenant-scoped or not, chunked
or not). The same runs go to two schemas built the same way, one through ``--engine dbt``
(a dbt invocation per window) and one through the compiled engine; after every run their fact
tables must be identical, with the facts' unique indexes in place throughout. After a final
run over the whole churned range both must equal a from-scratch build of the same sources.

One parsed ``DbtSession`` per schema serves every example (a dbt run costs seconds; a window
on a parsed session a fraction of one), so the examples share their database: each one ends
with the tables equal to a fresh build, which is where the next one starts. That is also why
shrinking is off: a shrunk example would start from a failed one's tables.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from dbtbackfill.core import planner
from dbtbackfill.core.planner import Window
from dbtbackfill.runner import session as runner
from tests.integration.conftest import TENANTS, execute, fact_checksums, load_demo

pytestmark = pytest.mark.integration

# Churn and backfills stay inside these days; the demo data runs 2024-01-20 .. 2024-03-04.
CHURN_START, CHURN_DAYS = date(2024, 2, 1), 14
CHURN_END = CHURN_START + timedelta(days=CHURN_DAYS - 1)
EVERYTHING = Window(0, date(2024, 1, 1), date(2024, 3, 31))
SCHEMAS = ("by_dbt", "compiled", "scratch")


@dataclass(frozen=True)
class Sessions:
    url: str
    # Not in failure reports: a session's repr is its whole manifest.
    by_dbt: runner.DbtSession = field(repr=False)
    compiled: runner.DbtSession = field(repr=False)
    scratch: runner.DbtSession = field(repr=False)
    models: tuple[str, ...]


@pytest.fixture(scope="module")
def sessions(module_db: str, cli_env: Path) -> Iterator[Sessions]:
    """Demo data, and both engines' schemas built over all of it (dbt creates the tables)."""
    url = load_demo(module_db)
    made: dict[str, runner.DbtSession] = {}
    try:
        for schema in SCHEMAS:
            os.environ["DBT_PG_SCHEMA"] = schema
            made[schema] = runner.DbtSession(url)
            made[schema].parse()
        models = tuple(made["compiled"].select_models([]))
        for schema in ("by_dbt", "compiled"):
            assert made[schema].run_window(EVERYTHING, None, []).success
        yield Sessions(url, made["by_dbt"], made["compiled"], made["scratch"], models)
    finally:
        for session in made.values():
            session.close()


# ------------------------------------------------------------------ upstream churn

days = st.integers(0, CHURN_DAYS - 1)
tenants = st.sampled_from(TENANTS)


@dataclass(frozen=True)
class Churn:
    """One change to ``raw.*``, on the first matching row of (tenant, day); none there, no-op."""

    kind: str
    tenant: str
    day: int
    shift: int = 0
    other: str = ""

    def sql(self) -> tuple[str, tuple[object, ...]]:
        day = CHURN_START + timedelta(days=self.day)
        moved_to = CHURN_START + timedelta(days=min(max(self.day + self.shift, 0), CHURN_DAYS - 1))
        shift = (moved_to - day).days
        on_day = (self.tenant, self.tenant, day)
        statements: dict[str, tuple[str, tuple[object, ...]]] = {
            "move_order": (
                "update raw.orders set ordered_at = ordered_at + %s * interval '1 day' where tenant_id = %s"
                " and order_id = (select min(order_id) from raw.orders where tenant_id = %s"
                " and (ordered_at at time zone 'UTC')::date = %s)",
                (shift, *on_day),
            ),
            "move_customer": (
                "update raw.customers set created_at = created_at + %s * interval '1 day' where tenant_id = %s"
                " and customer_id = (select min(customer_id) from raw.customers where tenant_id = %s"
                " and (created_at at time zone 'UTC')::date = %s)",
                (shift, *on_day),
            ),
            "delete_order": (
                "delete from raw.orders where tenant_id = %s"
                " and order_id = (select min(order_id) from raw.orders where tenant_id = %s"
                " and (ordered_at at time zone 'UTC')::date = %s)",
                on_day,
            ),
            "update_order": (
                "update raw.orders set amount = amount + 1.25,"
                " status = case status when 'returned' then 'placed' else 'returned' end where tenant_id = %s"
                " and order_id = (select min(order_id) from raw.orders where tenant_id = %s"
                " and (ordered_at at time zone 'UTC')::date = %s)",
                on_day,
            ),
            "insert_order": (
                "insert into raw.orders (tenant_id, order_id, customer_id, status, amount, ordered_at)"
                " select %s, coalesce(max(order_id), 0) + 1, 1, 'placed', 19.99, %s::date + interval '13 hours'"
                " from raw.orders where tenant_id = %s",
                (self.tenant, moved_to, self.tenant),
            ),
            # The order now belongs to another tenant, under a new id there.
            "retenant_order": (
                "update raw.orders set tenant_id = %s,"
                " order_id = (select coalesce(max(order_id), 0) + 1 from raw.orders where tenant_id = %s)"
                " where tenant_id = %s and order_id = (select min(order_id) from raw.orders where tenant_id = %s"
                " and (ordered_at at time zone 'UTC')::date = %s)",
                (self.other, self.other, *on_day),
            ),
        }
        return statements[self.kind]


CHURN_KINDS = ("move_order", "move_customer", "delete_order", "update_order", "insert_order", "retenant_order")

churns = st.builds(
    Churn,
    kind=st.sampled_from(CHURN_KINDS),
    tenant=tenants,
    day=days,
    shift=st.integers(-6, 6),
    other=tenants,
)


@dataclass(frozen=True)
class Run:
    """One backfill run: a range inside the churned days, maybe one tenant, maybe chunked."""

    start: int
    length: int
    tenant: str | None
    chunk: str | None

    def windows(self) -> list[Window]:
        start = CHURN_START + timedelta(days=self.start)
        end = min(start + timedelta(days=self.length - 1), CHURN_END)
        return planner.plan_windows(start, end, self.chunk, 1) if self.chunk else [Window(0, start, end)]


runs = st.builds(
    Run,
    start=days,
    length=st.integers(1, 7),
    tenant=st.none() | tenants,
    chunk=st.sampled_from((None, "day", "week")),
)


# ------------------------------------------------------------------ running both engines


def run_both(s: Sessions, run: Run) -> None:
    """The run through each engine; the compiled one must really be compiled, and agree."""
    windows = run.windows()
    engines: list[str] = []
    by_dbt = runner.run_windows(
        s.by_dbt, windows, tenant_id=run.tenant, selectors=[], models=s.models, engine="dbt", on_engine=engines.append
    )
    compiled = runner.run_windows(
        s.compiled, windows, tenant_id=run.tenant, selectors=[], models=s.models, on_engine=engines.append
    )
    assert by_dbt.success, by_dbt.error
    assert compiled.success, compiled.error
    assert engines[-1].startswith("compiled: "), engines
    assert [w.rows for w in compiled.windows] == [w.rows for w in by_dbt.windows]
    assert fact_checksums(s.url, schema="compiled") == fact_checksums(s.url, schema="by_dbt")


def build_from_scratch(s: Sessions) -> None:
    execute(s.url, "drop schema if exists scratch cascade")
    result = s.scratch.run_window(EVERYTHING, None, [])
    assert result.success, result.error


@settings(
    max_examples=4,
    deadline=None,
    derandomize=True,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(changes=st.lists(churns, min_size=1, max_size=6), backfills=st.lists(runs, min_size=1, max_size=3))
# The case that broke the compiled engine: an order moves to a later day and only that day is
# rebuilt, twice (overlapping runs), once for its tenant alone.
@example(
    changes=[Churn("move_order", "tenant-001", 1, shift=3)],
    backfills=[Run(4, 1, None, None), Run(3, 3, "tenant-001", "day")],
)
def test_the_engines_and_a_fresh_build_agree_after_any_churn(
    sessions: Sessions, changes: list[Churn], backfills: list[Run]
) -> None:
    for change in changes:
        stmt, params = change.sql()
        execute(sessions.url, stmt, *params)
    for run in backfills:
        run_both(sessions, run)
    # Everything the churn touched lies in the churned days: rebuilding them all, for every
    # tenant, must give what a build from nothing gives.
    run_both(sessions, Run(0, CHURN_DAYS, None, "week"))
    build_from_scratch(sessions)
    scratch = fact_checksums(sessions.url, schema="scratch")
    assert fact_checksums(sessions.url, schema="compiled") == scratch
    assert fact_checksums(sessions.url, schema="by_dbt") == scratch
