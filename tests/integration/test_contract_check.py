"""``dbt-backfill check`` and the runner's contract gate, on real dbt projects and a real PostgreSQL.

``tests/projects/traps`` holds one model per trap next to models that follow the
contract; each test asserts the exact findings per model, so a trap that goes unreported and a
good model that gets flagged both fail. Its models call the macros both bare and as
``dbt_backfill.<macro>``.
"""

from __future__ import annotations

import re
import shutil
import uuid
from pathlib import Path

import pytest
from psycopg import sql

from dbtbackfill.operator.jobs import EXIT_REFUSED
from tests.conftest import REPO_ROOT
from tests.integration.conftest import (
    audit_rows,
    copy_analytics_project,
    copy_tracked,
    db_state,
    execute,
    point_dbt_at,
    query,
    run_cli,
    run_tool,
    table_exists,
)

pytestmark = pytest.mark.integration

GOOD = (
    "good_orders",
    "good_daily",
    "good_order_of_day",
    "good_customer_orders",
    "good_latest_customer",
    "ignored_order_sequence",
)
#: Every finding `check` must report for the trap project, per model; nothing else.
EXPECTED = {
    "bad_no_window": {"no-window-filter"},
    "bad_no_delete_hook": {"no-delete-hook"},
    "bad_order_sequence": {"across-windows"},
    "bad_customer_totals": {"across-windows"},
    "bad_left_join": {"join-outside-window"},
    "bad_no_unique_index": {"unique-key-not-indexed"},
    "bad_no_window_index": {"window-column-not-indexed"},
    "bad_unindexed_input": {"window-column-not-indexed"},
}
_FINDING_RE = re.compile(r"^model (\w+): (.+) \[([a-z-]+)\]$")


@pytest.fixture(autouse=True)
def _isolated(fresh_env: None, dispose_engines: None) -> None:
    """Clean env, private dbt target dir (``cli_env``), engines disposed after."""


@pytest.fixture(scope="module")
def trap_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's layout in a private directory: tests/projects/traps beside dbt-package/.

    The project installs the package from ``../../../dbt-package``; the bare macro names come from
    analytics/'s forwarding macros, as in any project that kept the seed's spelling.
    """
    base = tmp_path_factory.mktemp("traps")
    for part in ("tests/projects/traps", "dbt-package"):
        copy_tracked(REPO_ROOT / part, base / part)
    project = base / "tests" / "projects" / "traps"
    (project / "macros").mkdir(exist_ok=True)
    shutil.copy2(REPO_ROOT / "analytics" / "macros" / "backfill.sql", project / "macros" / "backfill.sql")
    return project


@pytest.fixture(scope="module")
def trap_db(pristine_url: str) -> str:
    """Demo data, plus an input with no index on its window column."""
    execute(
        pristine_url, "create table if not exists raw.events (tenant_id text, event_id text, happened_at timestamptz)"
    )
    return pristine_url


def findings(out: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for m in map(_FINDING_RE.match, out.splitlines()):
        if m:
            found.setdefault(m[1], set()).add(m[3])
    return found


def test_check_reports_each_trap_on_its_model_and_nothing_on_the_good_ones(
    trap_project: Path, trap_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = db_state(trap_db)

    assert run_tool("check", "--project-dir", str(trap_project), "--database-url", trap_db) == 1

    out = capsys.readouterr().out
    assert findings(out) == EXPECTED, out
    for good in GOOD:
        assert f"model {good}:" not in out
    # Every finding says how to fix it, on the next line.
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if _FINDING_RE.match(line):
            assert lines[i + 1].startswith("  fix: "), line
    assert f"check: {sum(map(len, EXPECTED.values()))} finding(s) in {len(EXPECTED)} of 14 model(s): " in out
    assert "the window only through a left join (rows of raw.customers)" in out
    assert "row_number() over (partition by tenant_id, customer_id order by ordered_at, order_id)" in out
    assert db_state(trap_db) == before  # a check writes nothing


def test_check_of_the_good_models_exits_0(trap_project: Path, trap_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_tool("check", "--project-dir", str(trap_project), "--models", *GOOD, "--database-url", trap_db) == 0
    out = capsys.readouterr().out
    assert findings(out) == {}
    assert "check: 6 model(s) follow the backfill contract" in out


def test_the_analytics_project_passes_the_check(
    cli_env: Path, demo_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    project = str(cli_env / "analytics")
    assert run_cli("--start-date", "2024-02-01", "--end-date", "2024-02-02", "--database-url", demo_url) == 0
    capsys.readouterr()
    # The tables exist now, so their plans and the catalog's indexes are checked too.
    assert run_tool("check", "--project-dir", project, "--database-url", demo_url) == 0
    out = capsys.readouterr().out
    assert "note:" not in out
    assert out.splitlines()[-1] == "check: 3 model(s) follow the backfill contract"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--models", "'bad"), "has characters dbt selectors never use"),
        (("--models", "no_such_model"), "selection matched no models"),
        (("--database-url", "postgresql://u@127.0.0.1:1/x"), "cannot connect to the database"),
    ],
)
def test_check_bad_input_is_one_line_and_exit_2(
    trap_project: Path, trap_db: str, argv: tuple[str, ...], message: str, capfd: pytest.CaptureFixture[str]
) -> None:
    args = ["check", "--project-dir", str(trap_project)]
    if "--database-url" not in argv:
        args += ["--database-url", trap_db]
    assert run_tool(*args, *argv) == 2
    err = capfd.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("dbt-backfill check: error: ") and message in err


# ------------------------------------------------------------------ the runner's gate

FEB = ("--start-date", "2024-02-01", "--end-date", "2024-02-03")


@pytest.fixture
def in_trap_project(trap_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return point_dbt_at(trap_project, tmp_path, monkeypatch)


def test_run_refuses_a_model_that_never_reads_the_window_and_writes_nothing(
    in_trap_project: Path, demo_url: str, capfd: pytest.CaptureFixture[str]
) -> None:
    before = db_state(demo_url)

    assert run_cli(*FEB, "--models", "bad_no_window", "good_orders", "--database-url", demo_url) == EXIT_REFUSED

    err = capfd.readouterr().err
    [line] = [x for x in err.splitlines() if "error:" in x]
    assert line.startswith("run_dbt_backfill: error: model bad_no_window: never reads the window")
    assert line.endswith("nothing was run (pass --allow-full-rebuild to run it anyway)")
    assert db_state(demo_url) == before
    assert not table_exists(demo_url, "public", "backfill_executions")

    assert run_cli(*FEB, "--models", "bad_no_window", "--allow-full-rebuild", "--database-url", demo_url) == 0
    err = capfd.readouterr().err
    assert "warning: model bad_no_window: never reads the window" in err
    [(rows,)] = query(demo_url, "select count(*) from analytics.bad_no_window")
    [(everything,)] = query(demo_url, "select count(*) from raw.orders")
    assert rows == everything  # what the flag allows: a full rebuild


def test_run_refuses_cross_window_models_unless_allowed_and_warns_on_the_rest(
    in_trap_project: Path, demo_url: str, capfd: pytest.CaptureFixture[str]
) -> None:
    before = db_state(demo_url)
    models = ("--models", "bad_left_join", "bad_order_sequence", "bad_no_window_index")

    assert run_cli(*FEB, *models, "--database-url", demo_url) == EXIT_REFUSED
    err = capfd.readouterr().err
    [line] = [x for x in err.splitlines() if "error:" in x]
    assert "model bad_left_join: reads the window only through a left join" in line
    assert "model bad_order_sequence: row_number()" in line
    assert line.endswith("(pass --allow-cross-window to run it anyway)")
    assert db_state(demo_url) == before

    assert run_cli(*FEB, *models, "--allow-cross-window", "--database-url", demo_url) == 0
    err = capfd.readouterr().err
    warnings = [x for x in err.splitlines() if x.startswith("warning: ")]
    assert {m[1] for x in warnings if (m := re.match(r"warning: model (\w+): ", x))} == {
        "bad_left_join",
        "bad_order_sequence",
        "bad_no_window_index",
    }


def _table_digest(url: str, table: str) -> tuple[int, str]:
    """Row count and md5 of every row of ``schema.table``."""
    stmt = sql.SQL("select count(*), coalesce(md5(string_agg(t::text, '|' order by t::text)), '') from {} t")
    [(count, digest)] = query(url, stmt.format(sql.Identifier(*table.split("."))))
    return count, digest


def test_a_refused_chunk_is_a_failed_audit_row_with_the_refusal_and_touches_no_data(
    in_trap_project: Path, demo_url: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """What an operator chunk passes (--execution-id, --parent-id, ...): the refusal must reach its audit row."""
    assert run_cli(*FEB, "--models", "good_orders", "--database-url", demo_url) == 0
    [earlier] = audit_rows(demo_url)
    # A re-run of good_orders would now rewrite its rows; a refused run must not.
    execute(demo_url, "update raw.orders set amount = amount + 1 where ordered_at >= '2024-02-01'")
    facts, raw = _table_digest(demo_url, "analytics.good_orders"), _table_digest(demo_url, "raw.orders")
    tables = query(demo_url, "select schemaname, tablename from pg_tables order by 1, 2")
    chunk, parent = uuid.uuid4(), uuid.uuid4()
    capfd.readouterr()

    chunk_args = (
        *FEB, "--models", "good_orders", "bad_no_window", "--database-url", demo_url,
        "--execution-id", str(chunk), "--parent-id", str(parent), "--chunk-index", "3", "--attempt", "2",
        "--backfill-name", "feb", "--backfill-namespace", "shop", "--backfill-uid", "u-1",
    )  # fmt: skip
    code = run_cli(*chunk_args)

    assert code == EXIT_REFUSED
    err = capfd.readouterr().err
    [line] = [x for x in err.splitlines() if "error:" in x]
    prefix = "run_dbt_backfill: error: "
    assert line.startswith(prefix + "model bad_no_window: never reads the window")
    assert line.endswith("nothing was run (pass --allow-full-rebuild to run it anyway)")
    rows = audit_rows(demo_url)
    assert [r["id"] for r in rows] == [earlier["id"], chunk]
    row = rows[1]
    assert row["error_message"] == line.removeprefix(prefix)
    assert (row["status"], row["kind"], row["parent_id"], row["records_processed"]) == ("failed", "chunk", parent, 0)
    assert (row["chunk_index"], row["attempt"], row["backfill_name"], row["backfill_uid"]) == (3, 2, "feb", "u-1")
    assert (str(row["start_date"]), str(row["end_date"]), row["models"]) == (
        "2024-02-01", "2024-02-03", ["good_orders", "bad_no_window"]
    )  # fmt: skip
    assert row["finished_at"] is not None and row["target"]["database"] == earlier["target"]["database"]
    assert rows[0] == earlier
    # No data touched: the fact table still holds the old amounts, and no table came or went.
    assert _table_digest(demo_url, "analytics.good_orders") == facts
    assert _table_digest(demo_url, "raw.orders") == raw
    assert query(demo_url, "select schemaname, tablename from pg_tables order by 1, 2") == tables

    # `history` shows it, and a retry of the same attempt (same id) replaces that row, never adds one.
    assert run_tool("history", "--status", "failed", "--database-url", demo_url) == 0
    out = capfd.readouterr().out
    assert str(chunk) in out and "never reads the window" in " ".join(out.split())
    assert run_cli(*chunk_args) == EXIT_REFUSED
    rows = audit_rows(demo_url)
    assert [r["id"] for r in rows] == [earlier["id"], chunk]
    assert (rows[1]["status"], rows[1]["error_message"]) == ("failed", line.removeprefix(prefix))
    assert rows[1]["finished_at"] >= row["finished_at"]
    capfd.readouterr()

    # The same id for another execution (other models): still the refusal, plus why no row was written.
    assert (
        run_cli(*FEB, "--models", "bad_no_window", "--database-url", demo_url, "--execution-id", str(chunk))
        == EXIT_REFUSED
    )
    [conflict] = [x for x in capfd.readouterr().err.splitlines() if "error:" in x]
    assert conflict.startswith(prefix + "model bad_no_window: never reads the window")
    assert f"(its audit row {chunk} was not written: execution id {chunk} already belongs to" in conflict
    assert audit_rows(demo_url) == rows


def test_a_refused_run_without_an_execution_id_or_as_a_dry_run_writes_nothing(
    in_trap_project: Path, demo_url: str, capfd: pytest.CaptureFixture[str]
) -> None:
    before = db_state(demo_url)
    assert run_cli(*FEB, "--models", "bad_no_window", "--database-url", demo_url) == EXIT_REFUSED
    dry = ("--models", "bad_no_window", "--dry-run", "--execution-id", str(uuid.uuid4()))
    assert run_cli(*FEB, *dry, "--database-url", demo_url) == EXIT_REFUSED
    errors = [x for x in capfd.readouterr().err.splitlines() if "error:" in x]
    assert len(errors) == 2 and all("never reads the window" in x for x in errors)
    assert db_state(demo_url) == before
    assert not table_exists(demo_url, "public", "backfill_executions")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--start-date", "2024-02-05", "--end-date", "2024-02-01"), "start_date"),
        (("--models", "no_such_model", *FEB), "selection matched no models"),
        (("--project-dir", "/nonexistent/shop", *FEB), "no dbt project at /nonexistent/shop"),
        (("--models", "good_orders", "--chunk", "fortnight", *FEB), "invalid choice"),
    ],
)
def test_bad_input_with_an_execution_id_still_writes_nothing(
    in_trap_project: Path,
    demo_url: str,
    argv: tuple[str, ...],
    message: str,
    capfd: pytest.CaptureFixture[str],
) -> None:
    before = db_state(demo_url)
    ids = ("--execution-id", str(uuid.uuid4()), "--parent-id", str(uuid.uuid4()))

    assert run_cli(*argv, *ids, "--database-url", demo_url) == 2

    err = capfd.readouterr().err
    [line] = [x for x in err.splitlines() if "error:" in x]
    assert message in line, err
    assert db_state(demo_url) == before
    assert not table_exists(demo_url, "public", "backfill_executions")


# ------------------------------------------------------------------ --dry-run


def test_dry_run_names_the_engine(pristine_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(*FEB, "--dry-run", "--database-url", pristine_url) == 0
    err = capsys.readouterr().err
    # No table exists yet, and the range is one window: dbt runs it (and creates the tables).
    assert re.search(r"^engine: dbt per window: table .* does not exist yet$", err, re.M), err
    assert run_cli(*FEB, "--dry-run", "--engine", "dbt", "--database-url", pristine_url) == 0
    assert "engine: dbt per window: --engine dbt" in capsys.readouterr().err.splitlines()
    assert run_cli(*FEB, "--dry-run", "--chunk", "day", "--database-url", pristine_url) == 0
    assert re.search(r"^engine: dbt for the first window \(table", capsys.readouterr().err, re.M)


def test_dry_run_once_the_tables_exist_names_the_compiled_engine_and_writes_nothing(
    demo_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("--start-date", "2024-02-01", "--end-date", "2024-02-01", "--database-url", demo_url) == 0
    before = db_state(demo_url)
    capsys.readouterr()
    assert run_cli(*FEB, "--chunk", "day", "--dry-run", "--database-url", demo_url) == 0
    err = capsys.readouterr().err
    assert "engine: compiled: dbt would compile 3 model(s) once; one transaction per window" in err.splitlines()
    assert db_state(demo_url) == before


def test_dry_run_with_a_wrong_date_column_fails_with_one_line(
    cli_env: Path, pristine_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    project = copy_analytics_project(tmp_path / "analytics", source=cli_env / "analytics")
    stg = project / "models" / "staging" / "stg_orders.sql"
    stg.write_text(stg.read_text().replace("date_column='ordered_at'", "date_column='placed_at'"))
    point_dbt_at(project, tmp_path, monkeypatch)
    before = db_state(pristine_url)

    assert run_cli(*FEB, "--dry-run", "--database-url", pristine_url) == 2

    err = capfd.readouterr().err
    errors = [x for x in err.splitlines() if "error:" in x]
    assert errors == [
        'run_dbt_backfill: error: model fact_orders: its compiled SQL fails EXPLAIN: column "placed_at" does not exist'
        " [sql-error]"
    ], err
    assert db_state(pristine_url) == before
