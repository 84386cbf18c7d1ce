"""The cost estimate's database side: PostgreSQL's plans of each model for each window.

Every model is compiled once with the window as ``$1``/``$2`` (as the contract check does); its
generic plan names the scans the window filters, and ``EXPLAIN`` of the plan for each window's
real dates gives the planner's row estimate of those scans. Nothing is counted and nothing is
written. :mod:`dbtbackfill.core.cost` (pure) turns the plans into the report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dbtbackfill.core.cost import CostReport, Relation, WindowCost, merge_models, scan_rows
from dbtbackfill.core.planner import Window


def window_estimates(connect: Mapping[str, str], nodes: Sequence[Any], windows: Sequence[Window]) -> CostReport:
    """Estimate each window's source rows from the compiled (``$1``/``$2``) model ``nodes``."""
    import psycopg
    from psycopg.conninfo import make_conninfo

    from dbtbackfill.runner.compiled import _pg_message
    from dbtbackfill.runner.contract_check import explain_generic, model_shape, plan_facts

    notes: list[str] = []
    per_window: list[list[dict[Relation, int]]] = [[] for _ in windows]
    with psycopg.connect(make_conninfo(**connect), cursor_factory=psycopg.RawCursor, autocommit=False) as conn:
        conn.execute("set transaction read only")
        for n, shape in enumerate(model_shape(node) for node in nodes):
            if shape.materialized == "ephemeral" or shape.reads_window_vars:
                continue
            name = f"dbt_backfill_cost_{n}"
            prepared = False
            try:
                with conn.transaction():  # a savepoint: one model's error leaves the others estimable
                    facts = plan_facts(explain_generic(conn, shape.compiled_code, name))
                    relations = {(s.schema, s.table) for s in facts.windowed_scans}
                    if not relations:
                        continue
                    # A plan for each window's own dates, so the estimates see where they fall.
                    conn.execute("set local plan_cache_mode = force_custom_plan")
                    conn.execute(f"prepare {name} (date, date) as {shape.compiled_code}".encode())
                    prepared = True
                    for i, window in enumerate(windows):
                        # Our own dates, as ISO literals: EXPLAIN EXECUTE takes no bind parameters.
                        dates = f"'{window.start.isoformat()}'::date, '{window.end.isoformat()}'::date"
                        query = f"explain (verbose, format json) execute {name} ({dates})"
                        [(plan,)] = conn.execute(query.encode()).fetchall()
                        per_window[i].append(scan_rows(plan, relations))
            except psycopg.Error as e:
                notes.append(f"model {shape.name}: not estimated: {_pg_message(e)}")
            if prepared:  # prepared statements outlive a rollback
                conn.execute(f"deallocate {name}")
        conn.rollback()
    costs = tuple(WindowCost(w, merge_models(rows)) for w, rows in zip(windows, per_window, strict=True))
    return CostReport(costs, notes=tuple(notes))
