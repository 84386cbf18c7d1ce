"""Fixtures for the CLI and audit-log integration tests: demo databases, env isolation, engine cleanup.

Nothing here is autouse: the other integration modules in this directory do not need it.
Test modules opt in with their own autouse fixture that requests ``cli_env``/``fresh_env``/
``dispose_engines``.

Helpers (``query``, ``fact_checksums``, ``db_state`` ...) are plain functions so the test
modules can import them: ``from tests.integration.conftest import ...``.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterator, Sequence
from datetime import date
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

from dbtbackfill import cli
from dbtbackfill.core import audit
from dbtbackfill.demo.data import load_demo_data
from dbtbackfill.demo.localpg import LocalPostgres
from tests.conftest import REPO_ROOT, create_database

PROJECT_DIR = REPO_ROOT / "analytics"
FACTS = ("fact_customers", "fact_daily_revenue", "fact_orders")
# The UTC day each fact is windowed on.
WINDOW_DAY = {
    "fact_customers": "(created_at at time zone 'UTC')::date",
    "fact_daily_revenue": "order_date",
    "fact_orders": "(ordered_at at time zone 'UTC')::date",
}
# Demo data: 2024-01-20 .. 2024-03-04 (customers from 2024-01-13), i.e. more than February on
# both sides, 3 tenants, 5 orders per tenant per day: a few hundred rows, loaded in well under 1 s.
DEMO_START = date(2024, 1, 20)
DEMO_DAYS = 45
DEMO_TENANTS = 3
DEMO_ROWS_PER_DAY = 5
TENANTS = tuple(f"tenant-{n:03d}" for n in range(1, DEMO_TENANTS + 1))

# Every variable the CLI or the runner reads, or writes into os.environ (DbtSession does
# ``os.environ.update(dbt_env(url))`` and never undoes it).
ENV_KEYS = (
    "DATABASE_URL",
    "DBT_PG_HOST",
    "DBT_PG_PORT",
    "DBT_PG_USER",
    "DBT_PG_PASSWORD",
    "DBT_PG_DBNAME",
    "DBT_PG_SCHEMA",
    "DBT_PG_APPLICATION_NAME",
    "DBT_PG_CONNECT_TIMEOUT",
    "DBT_PG_KEEPALIVES_IDLE",
    "DBT_PROJECT_DIR",
    "DBT_PROFILES_DIR",
    "DBT_TARGET_PATH",
    "DBT_LOG_PATH",
    "DBT_THREADS",
    "DBT_SEND_ANONYMOUS_USAGE_STATS",
    "DO_NOT_TRACK",
)
# Per test: the connection settings a run leaves behind.
_RUN_KEYS = tuple(k for k in ENV_KEYS if k.startswith("DBT_PG_") or k == "DATABASE_URL")

# Every database URL a test handed to the CLI or to audit: their cached engines get disposed.
_USED_URLS: set[str] = set()


# ------------------------------------------------------------------ helpers


def register_url(url: str) -> str:
    _USED_URLS.add(url)
    return url


def dispose_cached_engines() -> None:
    """Close the pools of ``audit.engine_for``'s cached engines, then forget them.

    Dropping an engine without disposing it leaks open connections (ResourceWarning).
    """
    audit.dispose_engines()


def _register_urls(argv: Sequence[str]) -> None:
    for flag, value in itertools.pairwise(argv):
        if flag == "--database-url":
            register_url(value)
    if os.environ.get("DATABASE_URL"):
        register_url(os.environ["DATABASE_URL"])


def run_cli(*argv: str) -> int:
    """``cli.run_backfill`` in-process; argparse errors raise SystemExit(2), which counts as returning 2."""
    _register_urls(argv)
    try:
        return cli.run_backfill(list(argv))
    except SystemExit as exc:  # argparse rejected the arguments (it has already printed why)
        return exc.code if isinstance(exc.code, int) else 2


def run_tool(*argv: str) -> int:
    """``cli.main`` (the ``dbt-backfill`` console script), which always ends in SystemExit."""
    _register_urls(argv)
    with pytest.raises(SystemExit) as info:
        cli.main(list(argv))
    code = info.value.code
    return code if isinstance(code, int) else (0 if code is None else 2)


def nonempty_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def query(url: str, stmt: Any, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(stmt, params).fetchall()


def execute(url: str, stmt: Any, *params: Any) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute(stmt, params).rowcount


def table_exists(url: str, schema: str, table: str) -> bool:
    [(exists,)] = query(url, "select to_regclass(%s) is not null", f'"{schema}"."{table}"')
    return bool(exists)


def fact_checksums(url: str, schema: str = "analytics", where: str = "true") -> dict[str, tuple[int, str]]:
    """Per fact table: row count and md5 of all its rows (as text) in order, filtered by ``where``.

    ``where`` may use ``{day}``, the table's UTC window day.
    """
    out = {}
    for table in FACTS:
        stmt = sql.SQL(
            "select count(*), coalesce(md5(string_agg(t::text, '|' order by t::text)), '') from {}.{} t where {}"
        ).format(sql.Identifier(schema), sql.Identifier(table), sql.SQL(where.format(day=WINDOW_DAY[table])))
        [(count, digest)] = query(url, stmt)
        out[table] = (count, digest)
    return out


def audit_rows(url: str) -> list[dict[str, Any]]:
    """Every backfill_executions row, oldest first, as dicts."""
    with psycopg.connect(url) as conn, conn.cursor(row_factory=dict_row) as cur:
        return cur.execute("select * from backfill_executions order by created_at, id").fetchall()


def db_state(url: str) -> dict[str, Any]:
    """What a run could have written: user tables and sizes, audit rows, fact contents."""
    tables = query(
        url,
        "select table_schema, table_name from information_schema.tables"
        " where table_schema not in ('pg_catalog', 'information_schema') order by 1, 2",
    )
    state: dict[str, Any] = {"tables": tables, "schemas": query(url, "select nspname from pg_namespace order by 1")}
    if ("public", "backfill_executions") in tables:
        state["audit"] = [
            (r["id"], r["status"], r["updated_at"], r["records_processed"], r["error_message"]) for r in audit_rows(url)
        ]
    if all(("analytics", t) in tables for t in FACTS):
        state["facts"] = fact_checksums(url)
    return state


def copy_tracked(source: Path, dest: Path) -> Path:
    """The files git tracks under ``source``, as they are in the working tree, copied to ``dest``.

    Untracked files are left out on purpose: others work in this checkout concurrently and
    drop temporary models into analytics/models/ (a deliberately broken one, say), which would
    break every run here. Without git, everything but target/, logs/ and packages is copied.
    """
    import shutil
    import subprocess

    listed = subprocess.run(
        ["git", "ls-files", "-z", "--", "."], cwd=source, capture_output=True, check=False, timeout=30
    )
    if listed.returncode != 0 or not listed.stdout:
        shutil.copytree(source, dest, ignore=shutil.ignore_patterns("target", "logs", "dbt_packages", "__pycache__"))
        return dest
    for name in listed.stdout.decode().split("\0"):
        path = source / name
        if name and path.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest / name)
    return dest


def copy_analytics_project(dest: Path, source: Path = PROJECT_DIR) -> Path:
    """A private copy of a dbt project, with the dbt_backfill package beside it.

    analytics/packages.yml installs the package from ``../dbt-package``: the copy keeps that
    layout, so ``dbt deps`` (which the runner runs on first use) finds it.
    """
    copy_tracked(source, dest)
    package = dest.parent / "dbt-package"
    if not package.exists():
        copy_tracked(REPO_ROOT / "dbt-package", package)
    return dest


def point_dbt_at(project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make the runner use ``project``, with target and log dirs of this test's own."""
    monkeypatch.setenv("DBT_PROJECT_DIR", str(project))
    monkeypatch.setenv("DBT_TARGET_PATH", str(tmp_path / "target"))
    monkeypatch.setenv("DBT_LOG_PATH", str(tmp_path / "logs"))
    return project


def project_with_model(
    tmp_path: Path, cli_env: Path, monkeypatch: pytest.MonkeyPatch, name: str, model_sql: str
) -> Path:
    """A private copy of the module's analytics/ with one more fact model, made the project in use."""
    project = copy_analytics_project(tmp_path / "analytics", source=cli_env / "analytics")
    model = project / "models" / "facts" / f"{name}.sql"
    model.write_text(model_sql)
    point_dbt_at(project, tmp_path, monkeypatch)
    return model


def runner_env(url: str, cli_env: Path) -> dict[str, str]:
    """The environment of a runner subprocess, as a chunk Job has it: URL from the environment,
    the module's project copy and target dir (for its partial parse) in place of the image's."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    env.update(
        DATABASE_URL=url,
        DBT_PROJECT_DIR=str(cli_env / "analytics"),
        DBT_TARGET_PATH=str(cli_env / "target"),
        DBT_LOG_PATH=str(cli_env / "logs"),
        DBT_SEND_ANONYMOUS_USAGE_STATS="false",
        PYTHONUNBUFFERED="1",
    )
    return env


def load_demo(url: str, **overrides: Any) -> str:
    kwargs: dict[str, Any] = {
        "tenants": DEMO_TENANTS,
        "start_date": DEMO_START,
        "days": DEMO_DAYS,
        "rows_per_day": DEMO_ROWS_PER_DAY,
    }
    kwargs.update(overrides)
    load_demo_data(url, **kwargs)
    return register_url(url)


def snapshot_env(keys: Sequence[str]) -> dict[str, str | None]:
    return {k: os.environ.get(k) for k in keys}


def restore_env(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A clean environment for a module of CLI runs, on a private copy of analytics/.

    Yields the base dir: ``analytics/`` (the copy, as ``$DBT_PROJECT_DIR``), ``target/`` and
    ``logs/``. The checkout's analytics/ is shared with everyone working in it: its target/
    would be written concurrently and its models/ may hold someone's temporary model. The
    module's runs share one target dir, so after the first run dbt parses partially.
    """
    base = tmp_path_factory.mktemp("dbt")
    project = copy_analytics_project(base / "analytics")
    saved = snapshot_env(ENV_KEYS)
    for key in ENV_KEYS:
        os.environ.pop(key, None)
    os.environ.update(
        {
            "DBT_PROJECT_DIR": str(project),
            "DBT_TARGET_PATH": str(base / "target"),
            "DBT_LOG_PATH": str(base / "logs"),
            "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
            "DO_NOT_TRACK": "1",
        }
    )
    try:
        yield base
    finally:
        restore_env(saved)
        dispose_cached_engines()


@pytest.fixture
def fresh_env(cli_env: Path) -> Iterator[None]:
    """No DATABASE_URL and no DBT_PG_* at the start of a test; whatever a run leaves is undone after."""
    saved = snapshot_env(ENV_KEYS)
    for key in _RUN_KEYS:
        os.environ.pop(key, None)
    try:
        yield
    finally:
        restore_env(saved)


@pytest.fixture
def dispose_engines() -> Iterator[None]:
    yield
    dispose_cached_engines()


@pytest.fixture(scope="module")
def module_db(pg_server: LocalPostgres) -> Iterator[str]:
    """An empty database shared by one module's tests (dropped with the server)."""
    url = create_database(pg_server, f"m{os.getpid()}_{uuid.uuid4().hex[:8]}")
    yield register_url(url)


@pytest.fixture(scope="module")
def pristine_url(module_db: str) -> str:
    """Demo data in ``raw`` and nothing else; tests that use it must write nothing."""
    return load_demo(module_db)


@pytest.fixture
def demo_url(database_url: str) -> str:
    """Demo data in a fresh database of this test's own."""
    return load_demo(database_url)
