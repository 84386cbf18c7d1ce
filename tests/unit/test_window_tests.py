"""The pure half of ``--verify``: which tests run, how they are scoped, what query counts them.

The nodes are stand-ins with only the attributes of dbt's manifest nodes these functions read
(``config.pre_hook[].sql``, ``config.severity`` ...); the integration tests run real dbt.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from dbtbackfill.runner.window_tests import attached_tests, failures_query, scope, window_test


def model(*hooks: str, name: str = "fact_orders") -> Any:
    return SimpleNamespace(name=name, config=SimpleNamespace(pre_hook=[SimpleNamespace(sql=h) for h in hooks]))


def dbt_test_node(name: str, attached: str | None, severity: str = "ERROR", resource_type: str = "test") -> Any:
    config = SimpleNamespace(severity=severity, fail_calc="count(*)", error_if="!= 0")
    return SimpleNamespace(
        name=name, resource_type=resource_type, attached_node=attached, config=config, compiled_code="select 1"
    )


def test_scope_is_the_delete_hooks_window_and_the_tenant() -> None:
    m = model("set time zone 'UTC'", "{{ dbt_backfill.backfill_delete_window('ordered_at', 'org') }}")
    assert scope(m, "acme", None) == '"ordered_at" >= $1::date and "ordered_at" < $2::date + 1 and "org" = \'acme\''
    assert (
        scope(m, None, "status <> 'x'")
        == '(status <> \'x\') and "ordered_at" >= $1::date and "ordered_at" < $2::date + 1'
    )


def test_a_model_without_a_delete_hook_keeps_the_tests_own_where() -> None:
    assert scope(model("set time zone 'UTC'"), "acme", None) is None
    assert scope(model(), None, "a > 1") == "a > 1"


def test_only_error_severity_tests_attached_to_the_selected_models_run() -> None:
    nodes = [
        dbt_test_node("unique_a", "model.p.a"),
        dbt_test_node("warn_a", "model.p.a", severity="warn"),
        dbt_test_node("unique_b", "model.p.b"),
        dbt_test_node("singular", None),
        dbt_test_node("a", None, resource_type="model"),
    ]
    assert [n.name for n in attached_tests(nodes, {"model.p.a": object()})] == ["unique_a"]


def test_the_query_counts_like_dbts_test_materialization() -> None:
    sql = failures_query("select id from t group by id having count(*) > 1\n", "count(*)", "> 5")
    assert sql == (
        "select count(*) as failures, count(*) > 5 as should_error\n"
        "from (\nselect id from t group by id having count(*) > 1\n) dbt_internal_test"
    )


def test_a_window_test_carries_the_models_plain_pre_hooks_and_knows_if_it_takes_the_window() -> None:
    m = model("set time zone 'UTC'", "{{ backfill_delete_window('ordered_at') }}")
    node = dbt_test_node("unique_a", "model.p.a")
    node.compiled_code = "select * from t where x >= $1::date"
    t = window_test(node, m)
    assert (t.name, t.model, t.takes_window, t.setup) == ("unique_a", "fact_orders", True, ("set time zone 'UTC'",))
    node.compiled_code = "select * from t"
    assert window_test(node, m).takes_window is False
