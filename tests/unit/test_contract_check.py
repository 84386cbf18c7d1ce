"""The pure half of ``dbt-backfill check``: plan facts, window functions, findings.

The plans are abridged from ``EXPLAIN (VERBOSE, FORMAT JSON)`` output of PostgreSQL 15 for the
trap project's models (tests/fixtures/trap_project), keeping the keys the check reads.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from dbtbackfill.runner.compiled import WindowDelete, window_delete_hook
from dbtbackfill.runner.contract_check import (
    ACROSS_WINDOWS,
    ALLOW_CROSS_WINDOW,
    ALLOW_FULL_REBUILD,
    JOIN_OUTSIDE_WINDOW,
    NO_DELETE_HOOK,
    NO_WINDOW_FILTER,
    NOT_INCREMENTAL,
    UNIQUE_KEY_INDEX,
    WINDOW_COLUMN_INDEX,
    Index,
    ModelShape,
    PlanFacts,
    Scan,
    day_aligned,
    findings,
    plan_facts,
    window_calls,
)

WINDOWED_SQL = 'select * from raw.orders where 1=1 and "ordered_at" >= $1::date and "ordered_at" < $2::date + 1'
SEQUENCE_SQL = (
    "select row_number() over (partition by customer_id) from raw.orders"
    ' where "ordered_at" >= $1::date and "ordered_at" < $2::date + 1'
)


def scan(relation: str, alias: str, *, windowed: bool, schema: str = "raw") -> dict[str, Any]:
    node: dict[str, Any] = {"Node Type": "Seq Scan", "Relation Name": relation, "Schema": schema, "Alias": alias}
    if windowed:
        node["Filter"] = f"(({alias}.ordered_at >= $1) AND ({alias}.ordered_at < ($2 + 1)))"
    return node


def child(node: dict[str, Any], relationship: str) -> dict[str, Any]:
    return {**node, "Parent Relationship": relationship}


def join(kind: str, outer: dict[str, Any], inner: dict[str, Any]) -> dict[str, Any]:
    return {
        "Node Type": "Hash Join",
        "Join Type": kind,
        "Plans": [
            child(outer, "Outer"),
            {"Node Type": "Hash", "Parent Relationship": "Inner", "Plans": [child(inner, "Outer")]},
        ],
    }


def explain(root: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"Plan": root}]


def test_a_windowed_scan_windows_the_output_and_names_its_column() -> None:
    facts = plan_facts(explain(scan("orders", "orders", windowed=True)))
    assert (facts.reads_window, facts.output_windowed) == (True, True)
    assert facts.windowed_columns == {"ordered_at"}
    assert facts.windowed_scans == (Scan("raw", "orders", "ordered_at"),)


def test_no_parameter_anywhere_means_no_window() -> None:
    facts = plan_facts(explain(scan("orders", "orders", windowed=False)))
    assert (facts.reads_window, facts.output_windowed, facts.lost_joins) == (False, False, ())


@pytest.mark.parametrize(
    ("kind", "outer_windowed", "inner_windowed", "windowed", "lost"),
    [
        ("Inner", False, True, True, ()),
        ("Left", False, True, False, ("left join (rows of raw.customers)",)),
        ("Left", True, False, True, ()),
        ("Right", False, True, True, ()),
        ("Right", True, False, False, ("right join (rows of raw.orders)",)),
        ("Full", True, False, False, ("full join (rows of raw.customers)",)),
        ("Semi", False, True, True, ()),
        ("Anti", False, True, False, ("anti join (rows of raw.customers)",)),
    ],
)
def test_joins_carry_the_window_only_from_the_side_whose_rows_they_keep(
    kind: str, outer_windowed: bool, inner_windowed: bool, windowed: bool, lost: tuple[str, ...]
) -> None:
    outer = scan("customers", "c", windowed=outer_windowed)
    inner = scan("orders", "o", windowed=inner_windowed)
    facts = plan_facts(explain(join(kind, outer, inner)))
    assert facts.reads_window
    assert (facts.output_windowed, facts.lost_joins) == (windowed, lost)


def test_a_filter_above_an_outer_join_windows_it_again() -> None:
    node = join("Left", scan("customers", "c", windowed=False), scan("orders", "o", windowed=True))
    node["Filter"] = "(o.ordered_at >= $1)"
    assert plan_facts(explain(node)).output_windowed


def test_cte_scans_and_unions_follow_their_subplans() -> None:
    cte = {
        "Node Type": "Seq Scan",
        "Parent Relationship": "InitPlan",
        "Subplan Name": "CTE w",
        **scan("orders", "o", windowed=True),
    }
    root = {
        "Node Type": "Append",
        "Plans": [
            cte,
            {"Node Type": "CTE Scan", "CTE Name": "w", "Parent Relationship": "Member"},
            child(scan("orders", "o2", windowed=False), "Member"),
        ],
    }
    facts = plan_facts(explain(root))
    assert facts.reads_window and not facts.output_windowed  # one member of the union is unwindowed
    root["Plans"].pop()
    assert plan_facts(explain(root)).output_windowed


def test_window_functions_count_only_over_windowed_rows() -> None:
    def window_agg(windowed: bool) -> dict[str, Any]:
        return {"Node Type": "WindowAgg", "Plans": [child(scan("customers", "c", windowed=windowed), "Outer")]}

    assert plan_facts(explain(window_agg(True))).windowed_window_functions
    dimension = join("Inner", scan("orders", "o", windowed=True), window_agg(False))
    facts = plan_facts(explain(dimension))
    assert facts.output_windowed and not facts.windowed_window_functions


def test_group_keys_of_aggregates_over_windowed_rows_are_collected() -> None:
    agg = {
        "Node Type": "Aggregate",
        "Group Key": ["o.tenant_id", "o.customer_id"],
        "Plans": [child(scan("orders", "o", windowed=True), "Outer")],
    }
    assert plan_facts(explain(agg)).group_keys == ("o.tenant_id, o.customer_id",)
    unwindowed = {**agg, "Plans": [child(scan("orders", "o", windowed=False), "Outer")]}
    assert plan_facts(explain(unwindowed)).group_keys == ()
    plain = {"Node Type": "Aggregate", "Plans": agg["Plans"]}
    assert plan_facts(explain(plain)).group_keys == ("",)


@pytest.mark.parametrize(
    ("expression", "aligned"),
    [
        ("o.tenant_id, ((o.ordered_at AT TIME ZONE 'UTC'::text))::date", True),
        ("fact_orders.order_date", False),
        ("o.ordered_at", True),
        ("date_trunc('day'::text, o.ordered_at)", True),
        ("date_trunc('month'::text, o.ordered_at)", False),
        ("EXTRACT(dow FROM o.ordered_at)", False),
        ("o.tenant_id, o.customer_id", False),
        ("o.ordered_at_local", False),
        ("", False),
    ],
)
def test_day_aligned(expression: str, aligned: bool) -> None:
    assert day_aligned(expression, {"ordered_at"}) is aligned


def test_window_calls_read_partition_by_inline_and_named_windows() -> None:
    sql = (
        "select row_number() over (partition by tenant_id, customer_id order by ordered_at) as seq,"
        " sum(amount) over w as running, rank() over (order by amount) as r,"
        " lag(x) over (partition by (ordered_at at time zone 'UTC')::date rows between 1 preceding and current row)"
        " from orders window w as (partition by tenant_id order by ordered_at)"
        " -- over (partition by nothing): a comment\n"
    )
    calls = window_calls(sql)
    assert [(c.function, c.partition) for c in calls] == [
        ("row_number()", "tenant_id, customer_id"),
        ("sum()", "tenant_id"),
        ("rank()", ""),
        ("lag()", "(ordered_at at time zone 'UTC')::date"),
    ]
    assert calls[0].clause == "over (partition by tenant_id, customer_id order by ordered_at)"


def shape(**changes: Any) -> ModelShape:
    base = ModelShape(
        name="fact_x",
        materialized="incremental",
        compiled_code=WINDOWED_SQL,
        schema="analytics",
        table="fact_x",
        unique_key=("tenant_id", "order_id"),
        window_deletes=(WindowDelete("ordered_at"),),
        declared_indexes=(Index(("tenant_id", "order_id"), unique=True), Index(("ordered_at",))),
    )
    return ModelShape(**{**base.__dict__, **changes})


GOOD_PLAN = PlanFacts(True, True, frozenset({"ordered_at"}), (Scan("raw", "orders", "ordered_at"),))


def codes(shape_: ModelShape, plan: PlanFacts | None = GOOD_PLAN, **kwargs: Any) -> list[str]:
    return [f.code for f in findings(shape_, plan, **kwargs)]


def test_a_model_that_follows_the_contract_has_no_findings() -> None:
    assert codes(shape(), input_indexes={("raw", "orders"): [Index(("ordered_at",))]}) == []


def test_each_trap_has_its_finding_and_its_override() -> None:
    no_window = findings(shape(compiled_code="select * from raw.orders"), PlanFacts(False, False))
    assert [(f.code, f.override) for f in no_window] == [(NO_WINDOW_FILTER, ALLOW_FULL_REBUILD)]
    lost = PlanFacts(True, False, frozenset({"ordered_at"}), lost_joins=("left join (rows of raw.customers)",))
    assert [(f.code, f.override) for f in findings(shape(), lost)] == [(JOIN_OUTSIDE_WINDOW, ALLOW_CROSS_WINDOW)]
    grouped = PlanFacts(True, True, frozenset({"ordered_at"}), group_keys=("o.customer_id",))
    assert codes(shape(), grouped) == [ACROSS_WINDOWS]
    seq = shape(compiled_code=SEQUENCE_SQL)
    assert codes(seq, replace(GOOD_PLAN, windowed_window_functions=True)) == [ACROSS_WINDOWS]
    assert codes(seq) == []  # its window functions read only unwindowed rows (a deduplicated dimension)
    assert codes(shape(window_deletes=())) == [NO_DELETE_HOOK]
    assert codes(shape(declared_indexes=(Index(("ordered_at",)),))) == [UNIQUE_KEY_INDEX]
    assert codes(shape(declared_indexes=(Index(("tenant_id", "order_id"), unique=True),))) == [WINDOW_COLUMN_INDEX]
    assert codes(shape(), input_indexes={("raw", "orders"): [Index(("tenant_id", "ordered_at"))]}) == [
        WINDOW_COLUMN_INDEX
    ]
    assert codes(shape(materialized="table")) == [NOT_INCREMENTAL]
    for f in findings(shape(window_deletes=()), GOOD_PLAN):
        assert f.override is None and f.fix


def test_an_existing_tables_catalog_decides_and_a_unique_index_on_part_of_the_key_covers_it() -> None:
    bare = shape(declared_indexes=())
    assert codes(bare, table_indexes=[Index(("order_id",), unique=True), Index(("ordered_at", "tenant_id"))]) == []
    # Declared after the table was created: dbt never added them, so they do not count.
    assert codes(shape(), table_indexes=[]) == [UNIQUE_KEY_INDEX, WINDOW_COLUMN_INDEX]


def test_meta_ignore_silences_only_the_named_codes() -> None:
    plan = replace(GOOD_PLAN, windowed_window_functions=True)
    seq = shape(compiled_code=SEQUENCE_SQL, window_deletes=())
    assert codes(seq, plan) == [ACROSS_WINDOWS, NO_DELETE_HOOK]
    assert codes(replace(seq, ignore=frozenset({ACROSS_WINDOWS})), plan) == [NO_DELETE_HOOK]


def test_ephemeral_models_are_checked_through_their_readers() -> None:
    assert codes(shape(materialized="ephemeral", compiled_code="select 1"), None) == []


def test_without_a_plan_the_compiled_sql_still_shows_a_missing_window() -> None:
    assert codes(shape(compiled_code="select * from analytics.fact_orders"), None) == [NO_WINDOW_FILTER]
    assert codes(shape(), None) == []


@pytest.mark.parametrize(
    "hook",
    [
        "{{ backfill_delete_window('ordered_at') }}",
        "{{ dbt_backfill.backfill_delete_window('ordered_at') }}",
        "{{- dbt_backfill.backfill_delete_window(date_column='ordered_at', tenant_column='org_id') -}}",
    ],
)
def test_the_delete_hook_is_found_bare_and_from_the_dbt_backfill_package(hook: str) -> None:
    found = window_delete_hook(hook)
    assert found is not None and found.date_column == "ordered_at"


def test_other_hooks_are_not_delete_hooks() -> None:
    assert window_delete_hook("{{ other.backfill_delete_window('ordered_at') }}") is None
    assert window_delete_hook("set time zone 'UTC'") is None
