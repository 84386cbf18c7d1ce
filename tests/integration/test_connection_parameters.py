"""Every parameter of the database URL reaches every connection a run opens: dbt's, the compiled
engine's and the audit log's; a URL that cannot work is one line and writes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.conftest import (
    db_state,
    execute,
    nonempty_lines,
    project_with_model,
    query,
    register_url,
    run_cli,
    run_tool,
    table_exists,
)

pytestmark = pytest.mark.integration

# A contract model whose first pre-hook records what its connection was given. dbt runs it in
# the first window (the tables do not exist yet), the compiled engine in the others.
WITNESS_MODEL_SQL = """\
{{ config(materialized='incremental', incremental_strategy='delete+insert', unique_key=['tenant_id', 'order_id'],
          pre_hook=["insert into public.seen (application_name, lock_timeout)
                     values (current_setting('application_name'), current_setting('lock_timeout'))",
                    "{{ backfill_delete_window('ordered_at') }}"]) }}
select tenant_id, order_id, ordered_at
from {{ source('raw', 'orders') }}
where 1=1
  {{ backfill_date_range(var('backfill_start_date'), var('backfill_end_date'), var('tenant_id'),
                         date_column='ordered_at') }}
"""
APP = "backfill-param-test"
PARAMS = f"application_name={APP}&options=-c%20lock_timeout%3D4321"


@pytest.fixture(autouse=True)
def _isolated(fresh_env: None, dispose_engines: None) -> None:
    """Clean env (no DATABASE_URL), private dbt target dir, engines disposed after."""


@pytest.fixture
def witness_project(tmp_path: Path, cli_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project_with_model(tmp_path, cli_env, monkeypatch, "zz_witness", WITNESS_MODEL_SQL)


def test_the_urls_parameters_reach_dbt_the_compiled_engine_and_the_audit_log(
    demo_url: str, witness_project: None, capsys: pytest.CaptureFixture[str]
) -> None:
    execute(demo_url, "create table public.seen (application_name text, lock_timeout text)")
    url = register_url(f"{demo_url}?{PARAMS}")

    assert (
        run_cli("--start-date", "2024-02-08", "--end-date", "2024-02-10", "--chunk", "day", "--database-url", url) == 0
    )

    engines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("engine: ")]
    assert engines[0].startswith("engine: dbt for the first window: ")
    assert engines[1].startswith("engine: compiled: ")
    seen = query(demo_url, "select application_name, lock_timeout from public.seen")
    assert len(seen) == 3  # one per window: dbt's connection once, the compiled engine's twice
    assert set(seen) == {(APP, "4321ms")}
    # The audit log's pooled connections are still open (this process ran the CLI).
    sessions = query(
        demo_url,
        "select application_name from pg_stat_activity where datname = current_database() and pid <> pg_backend_pid()",
    )
    assert sessions and {name for (name,) in sessions} == {APP}, sessions


def test_history_connects_with_the_urls_parameters(demo_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    execute(demo_url, "create table public.seen (application_name text, lock_timeout text)")
    assert run_tool("history", "--database-url", register_url(f"{demo_url}?{PARAMS}")) == 0
    sessions = query(
        demo_url,
        "select application_name from pg_stat_activity where datname = current_database() and pid <> pg_backend_pid()",
    )
    assert sessions and {name for (name,) in sessions} == {APP}, sessions


@pytest.mark.parametrize(
    ("params", "message"),
    [
        # The test server has no SSL: every connection must fail, the first one says why.
        ("sslmode=require", "server does not support SSL, but SSL was required"),
        ("nosuchparameter=1", 'database URL is not valid: invalid URI query parameter: "nosuchparameter"'),
        ("keepalives_interval=5", "database URL parameter keepalives_interval cannot reach dbt's connections"),
    ],
    ids=["sslmode-require", "unknown-parameter", "no-route-to-dbt"],
)
def test_a_url_that_cannot_work_is_one_line_and_writes_nothing(
    pristine_url: str, params: str, message: str, capfd: pytest.CaptureFixture[str]
) -> None:
    before = db_state(pristine_url)
    url = register_url(f"{pristine_url}?{params}")
    capfd.readouterr()

    assert run_cli("--start-date", "2024-02-01", "--end-date", "2024-02-02", "--database-url", url) == 2

    out, err = capfd.readouterr()
    lines = nonempty_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith("run_dbt_backfill: error: ") and message in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert db_state(pristine_url) == before
    assert not table_exists(pristine_url, "public", "backfill_executions")
