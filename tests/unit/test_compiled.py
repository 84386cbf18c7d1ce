"""The pure half of compiled windows: which models qualify, in what order, with which SQL."""

from __future__ import annotations

from dataclasses import replace

import pytest

from dbtbackfill.runner.compiled import (
    PARAM_END,
    PARAM_START,
    Hook,
    ModelNode,
    NotCompilable,
    WindowDelete,
    column_drift,
    compiled_vars,
    delete_insert_sql,
    model_plan,
    plan_models,
    probe_sql,
    quote_ident,
    temp_relation,
    temp_table_sql,
    window_delete_sql,
)

SQL = 'select * from raw.orders where 1=1\n  and "ordered_at" >= $1::date and "ordered_at" < $2::date + 1'


def node(name: str = "fact_orders", **changes: object) -> ModelNode:
    base = ModelNode(
        unique_id=f"model.analytics.{name}",
        name=name,
        materialized="incremental",
        compiled_code=SQL,
        relation_name=f'"db"."analytics"."{name}"',
        schema="analytics",
        table=name,
        incremental_strategy="delete+insert",
        unique_key=("tenant_id", "order_id"),
        pre_hooks=(Hook("set time zone 'UTC'"), Hook("{{ backfill_delete_window('ordered_at') }}")),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def test_a_contract_model_plans_its_hooks_in_order() -> None:
    plan = model_plan(node())
    assert plan.pre_hooks == ("set time zone 'UTC'", WindowDelete("ordered_at", "tenant_id"))
    assert plan.relation == '"db"."analytics"."fact_orders"'
    assert plan.unique_key == ("tenant_id", "order_id")


@pytest.mark.parametrize(
    ("hook", "expected"),
    [
        ("{{ backfill_delete_window('created_at') }}", WindowDelete("created_at")),
        ('{{backfill_delete_window("created_at")}}', WindowDelete("created_at")),
        ("{{ backfill_delete_window('day', tenant_column='org_id') }}", WindowDelete("day", "org_id")),
        ("{{ backfill_delete_window('day', 'org_id') }}", WindowDelete("day", "org_id")),
        ("{{ backfill_delete_window(date_column='day') }}", WindowDelete("day")),
        ("{{ dbt_backfill.backfill_delete_window('ordered_at') }}", WindowDelete("ordered_at")),
        ("{{ dbt_backfill.backfill_delete_window('day', tenant_column='store_id') }}", WindowDelete("day", "store_id")),
        ("{{ dbt_backfill.backfill_delete_window('date_day', tenant_column=none) }}", WindowDelete("date_day", None)),
    ],
)
def test_the_window_delete_hook_is_read_in_each_spelling(hook: str, expected: WindowDelete) -> None:
    assert model_plan(node(pre_hooks=(Hook(hook),))).pre_hooks == (expected,)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"materialized": "table"}, "materialized as table"),
        ({"materialized": "view"}, "materialized as view"),
        ({"incremental_strategy": "merge"}, "incremental_strategy merge"),
        ({"unique_key": ()}, "no unique_key"),
        ({"unique_key": ("tenant_id || order_id",)}, "no unique_key of plain column names"),
        ({"post_hooks": (Hook("analyze {{ this }}"),)}, "post-hooks"),
        ({"incremental_predicates": ("x > 1",)}, "incremental_predicates"),
        ({"grants": True}, "grants"),
        ({"relation_name": None}, "no relation"),
        ({"compiled_code": f"select '{PARAM_START}' as s, $1, $2"}, "outside backfill_date_range"),
        ({"compiled_code": f"select '{PARAM_END}' as e, $1, $2"}, "outside backfill_date_range"),
        ({"compiled_code": "select * from raw.orders"}, "does not filter its input"),
        (
            {"pre_hooks": (Hook("{{ backfill_delete_window('a') }}", inside_transaction=False),)},
            "outside the transaction",
        ),
        ({"pre_hooks": (Hook("{{ log('x') }}"), Hook("{{ backfill_delete_window('a') }}"))}, "not one plain SQL"),
        ({"pre_hooks": (Hook("set a = 1; set b = 2"), Hook("{{ backfill_delete_window('a') }}"))}, "not one plain SQL"),
        ({"pre_hooks": (Hook("set time zone 'UTC'"),)}, "exactly one backfill_delete_window"),
        ({"pre_hooks": (Hook("{{ backfill_delete_window('a') }}"),) * 2}, "exactly one backfill_delete_window"),
    ],
)
def test_models_outside_the_contract_say_why(changes: dict[str, object], reason: str) -> None:
    with pytest.raises(NotCompilable, match=reason) as info:
        model_plan(node(**changes))
    assert "model fact_orders" in str(info.value)


def test_a_trailing_semicolon_on_a_static_hook_is_fine() -> None:
    plan = model_plan(node(pre_hooks=(Hook(" set time zone 'UTC'; "), Hook("{{ backfill_delete_window('a') }}"))))
    assert plan.pre_hooks[0] == "set time zone 'UTC'"


def test_plans_run_readers_after_what_they_read_and_skip_ephemerals() -> None:
    nodes = [
        node("fact_daily_revenue", depends_on=("model.analytics.fact_orders",)),
        node("stg_orders", materialized="ephemeral"),
        node("fact_orders", depends_on=("source.analytics.raw.orders",)),
        node("fact_customers"),
        node("fact_a_reader", depends_on=("model.analytics.fact_daily_revenue",)),
    ]
    assert [p.name for p in plan_models(nodes)] == [
        "fact_customers",
        "fact_orders",
        "fact_daily_revenue",
        "fact_a_reader",
    ]


def test_one_model_outside_the_contract_disqualifies_the_selection() -> None:
    with pytest.raises(NotCompilable, match="model zz_table is materialized as table"):
        plan_models([node(), node("zz_table", materialized="table")])


def test_the_window_delete_is_the_macros_predicate_with_parameters() -> None:
    plan = model_plan(node())
    hook = WindowDelete("ordered_at")
    assert window_delete_sql(plan, hook, None) == (
        'delete from "db"."analytics"."fact_orders"\nwhere "ordered_at" >= $1::date and "ordered_at" < $2::date + 1'
    )
    assert window_delete_sql(plan, WindowDelete("ordered_at", "org"), "acme-1").endswith(
        """< $2::date + 1 and "org" = 'acme-1'"""
    )
    # Quoting holds even for input the CLI would have refused.
    assert window_delete_sql(plan, hook, "o'hara").endswith("""= 'o''hara'""")
    # A table without tenants (tenant_column=none) loses the window for every tenant.
    assert window_delete_sql(plan, WindowDelete("date_day", None), "acme-1").endswith("< $2::date + 1")


def test_delete_insert_is_dbts_two_statements_over_a_temporary_table() -> None:
    # dbt-adapters 1.x default__get_delete_insert_merge_sql: the delete is its own statement and
    # runs before the insert (a data-modifying CTE would not: it sees the insert's snapshot).
    plan = model_plan(node())
    temp = temp_relation(plan, 0)
    assert temp == '"fact_orders__dbt_tmp0"'
    assert temp_table_sql(plan, temp) == f"create temporary table {temp} on commit drop as (\n{SQL}\n)"
    delete, insert = delete_insert_sql(plan, temp, ["tenant_id", "order_id", "Amount"])
    assert delete == (
        'delete from "db"."analytics"."fact_orders" as DBT_INTERNAL_DEST\n'
        "where (tenant_id, order_id) in (\n"
        "    select distinct tenant_id, order_id\n"
        '    from "fact_orders__dbt_tmp0" as DBT_INTERNAL_SOURCE\n)'
    )
    assert insert == (
        'insert into "db"."analytics"."fact_orders" ("tenant_id", "order_id", "Amount")\n(\n'
        '    select "tenant_id", "order_id", "Amount"\n    from "fact_orders__dbt_tmp0"\n)'
    )
    assert ";" not in delete + insert and "with " not in delete + insert


def test_temporary_relations_stay_within_postgres_identifier_limit() -> None:
    plan = model_plan(node("f" * 70, table="f" * 70))
    names = {temp_relation(plan, n) for n in range(12)}
    assert len(names) == 12
    assert all(len(name.strip('"')) == 63 for name in names if name.endswith('11"'))
    assert all(len(name.strip('"')) <= 63 for name in names)


def test_a_trailing_comment_in_the_model_cannot_swallow_the_wrapper() -> None:
    plan = model_plan(node(compiled_code=SQL + "\n-- the end"))
    assert "-- the end\n)" in temp_table_sql(plan, "t")
    assert "-- the end\n) as model_columns limit 0" in probe_sql(plan)


def test_column_drift_names_new_and_gone_columns() -> None:
    plan = model_plan(node())
    assert column_drift(plan, ["a", "b"], ["b", "a"]) is None
    assert column_drift(plan, ["a", "c"], ["a", "b"]) == (
        'model fact_orders\'s columns differ from "db"."analytics"."fact_orders" (new c; gone b)'
    )
    assert column_drift(plan, ["a"], ["a", "b"]) is not None


def test_quote_ident_doubles_quotes() -> None:
    assert quote_ident('we"ird') == '"we""ird"'


def test_compiled_vars_carry_the_placeholders_and_the_tenant() -> None:
    assert compiled_vars("acme") == {
        "backfill_start_date": PARAM_START,
        "backfill_end_date": PARAM_END,
        "tenant_id": "acme",
    }
