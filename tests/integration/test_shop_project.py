"""Bring your own project: the runner on tests/projects/shop, a project shaped like a real one.

The shop project (jaffle-shop style) has its own profile and variables (``SHOP_PG_*``), a tenant
column called ``store_id``, two local packages (dbt_backfill and shop_utils), a disabled seed
folder, a snapshot, semantic models with metrics and a saved query, a unit test, versioned and
contracted models, a child table without a date, a microbatch model and an exposure. Nothing in
it was changed for the runner. Everything runs for real: PostgreSQL, ``dbt deps``, dbt itself
(the from-scratch builds run dbt in-process, exactly as ``dbt build`` would), and the CLI.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from dbt.cli.main import dbtRunner
from psycopg import sql

from dbtbackfill.operator.jobs import EXIT_REFUSED
from tests.conftest import REPO_ROOT
from tests.integration.conftest import (
    audit_rows,
    copy_tracked,
    execute,
    nonempty_lines,
    query,
    register_url,
    run_cli,
    table_exists,
)
from tests.support.shop_data import STORES, load_shop_data, shop_env

pytestmark = pytest.mark.integration

START = date(2024, 1, 1)
DAYS = 12
LAST = date(2024, 1, 12)
RANGE = ("--start-date", START.isoformat(), "--end-date", LAST.isoformat())
MARTS = ("customers_v1", "customers_v2", "daily_store_revenue", "metricflow_time_spine", "order_items", "orders")


@pytest.fixture(scope="module")
def shop_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's layout in a private directory: tests/projects/{shop,shop_utils} and dbt-package/.

    The shop's packages.yml installs ``../../../dbt-package`` and ``../shop_utils`` as ``local:``
    packages, as a user's project would; nothing is installed yet (``dbt_packages`` is not copied).
    """
    base = tmp_path_factory.mktemp("layout")
    for part in ("tests/projects/shop", "tests/projects/shop_utils", "dbt-package"):
        copy_tracked(REPO_ROOT / part, base / part)
    project = base / "tests" / "projects" / "shop"
    assert not (project / "dbt_packages").exists()
    return project


@pytest.fixture
def shop(
    shop_layout: Path, database_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """Raw shop data in a fresh database; the shop profile's variables point at it; DATABASE_URL too."""
    for key in ("DATABASE_URL", "DBT_PROJECT_DIR", "DBT_PROFILES_DIR", "DBT_TARGET", "DBT_PG_SCHEMA"):
        monkeypatch.delenv(key, raising=False)
    work = tmp_path_factory.getbasetemp() / "shop-dbt"  # one target dir per session: partial parsing
    monkeypatch.setenv("DBT_TARGET_PATH", str(work / "target"))
    monkeypatch.setenv("DBT_LOG_PATH", str(work / "logs"))
    monkeypatch.setenv("DBT_SEND_ANONYMOUS_USAGE_STATS", "false")
    for key, value in shop_env(database_url).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DATABASE_URL", register_url(database_url))
    load_shop_data(database_url, start=START, days=DAYS, per_day=6)
    yield database_url


def dbt(project: Path, *args: str, schema: str, tmp: Path) -> Any:
    """``dbt <args>`` in-process on ``project``, writing into ``schema`` (the shop's SHOP_SCHEMA)."""
    import os

    saved = os.environ.get("SHOP_SCHEMA")
    os.environ["SHOP_SCHEMA"] = schema
    try:
        argv = ["--quiet", "--no-use-colors", "--log-level-file", "none", *args]
        argv += ["--project-dir", str(project), "--profiles-dir", str(project)]
        argv += ["--target-path", str(tmp / f"target-{schema}"), "--log-path", str(tmp / "logs")]
        return dbtRunner().invoke(argv)
    finally:
        if saved is None:
            os.environ.pop("SHOP_SCHEMA", None)
        else:
            os.environ["SHOP_SCHEMA"] = saved


def build_from_scratch(project: Path, schema: str, tmp: Path) -> None:
    """Plain ``dbt build`` (no backfill vars): seeds, snapshot, models, unit and data tests."""
    end = date.fromordinal(LAST.toordinal() + 1).isoformat()
    res = dbt(
        project, "build", "--event-time-start", START.isoformat(), "--event-time-end", end, schema=schema, tmp=tmp
    )
    assert res.success, res.exception
    statuses = {r.node.resource_type: set() for r in res.result.results}
    for r in res.result.results:
        statuses[r.node.resource_type].add(str(r.status))
    assert statuses["model"] == {"success"}
    assert statuses["test"] == {"pass"}  # data tests on keys and the unit test
    assert {"seed", "snapshot", "unit_test"} <= set(statuses)


def checksums(url: str, schema: str) -> dict[str, tuple[int, str]]:
    """Row count and md5 of every mart's rows, in the backfilled range."""
    day = {"metricflow_time_spine": "date_day", "daily_store_revenue": "order_date"}
    out = {}
    for table in MARTS:
        where = f"{day[table]} between date '{START}' and date '{LAST}'" if table in day else "true"
        stmt = sql.SQL(
            "select count(*), coalesce(md5(string_agg(t::text, '|' order by t::text)), '') from {} t where {}"
        ).format(sql.Identifier(schema, table), sql.SQL(where))
        [(count, digest)] = query(url, stmt)
        out[table] = (count, digest)
    return out


def err_lines(capfd: pytest.CaptureFixture[str]) -> list[str]:
    return nonempty_lines(capfd.readouterr().err)


def test_a_daily_backfill_equals_a_from_scratch_build(
    shop: str, shop_layout: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    url = shop
    assert run_cli(*RANGE, "--chunk", "day", "--project-dir", str(shop_layout)) == 0
    lines = err_lines(capfd)
    # dbt deps ran by itself: both local packages are installed.
    for package in ("dbt_backfill", "shop_utils"):
        assert (shop_layout / "dbt_packages" / package / "dbt_project.yml").is_file(), package
    engines = [line for line in lines if line.startswith("engine: ")]
    assert engines == [
        'engine: dbt for the first window: table "' + url.rsplit("/", 1)[1] + '"."jaffle"."customers_v1" does not'
        " exist yet",
        "engine: compiled: dbt compiled 5 model(s) once; one transaction per window;"
        " then dbt runs microbatch daily_store_revenue once over the range, batch by batch",
    ], lines
    assert sum(line.startswith("window ") and " ok " in line for line in lines) == DAYS
    [microbatch] = [line for line in lines if line.startswith("microbatch ")]
    assert microbatch.startswith("microbatch 2024-01-02..2024-01-12 ok rows=33 "), microbatch  # 11 days x 3 stores

    # A plain `dbt build` of the same project, from scratch, into another schema: the same rows.
    build_from_scratch(shop_layout, "whole", tmp_path)
    assert checksums(url, "jaffle") == checksums(url, "whole")
    [(orders,)] = query(url, "select count(*) from jaffle.orders")
    assert orders == DAYS * 6 * len(STORES)

    # A normal incremental run without any var (dbt's own incremental logic) changes nothing.
    before = checksums(url, "whole")
    res = dbt(shop_layout, "run", schema="whole", tmp=tmp_path)
    assert res.success, res.exception
    assert checksums(url, "whole") == before

    # Change raw rows on two days (a vanished order, a child row with no date of its own).
    execute(url, "delete from raw.order_items where store_id = 'chicago' and order_id = 20 and item_id > 1")
    execute(url, "update raw.order_items set quantity = 9 where store_id = 'philly' and order_id = 25")
    execute(url, "delete from raw.orders where store_id = 'brooklyn' and order_id = 27")
    execute(url, "delete from raw.order_items where store_id = 'brooklyn' and order_id = 27")
    assert run_cli("--start-date", "2024-01-04", "--end-date", "2024-01-05", "--chunk", "day",
                   "--project-dir", str(shop_layout)) == 0  # fmt: skip
    capfd.readouterr()
    execute(url, "drop schema whole cascade")
    execute(url, "drop schema whole_snapshots cascade")
    build_from_scratch(shop_layout, "whole", tmp_path)
    assert checksums(url, "jaffle") == checksums(url, "whole")
    assert query(url, "select count(*) from jaffle.orders where store_id = 'brooklyn' and order_id = 27") == [(0,)]


def test_both_engines_write_the_same_rows(
    shop: str, shop_layout: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every window through dbt (the manifest copy per invocation, microbatch with the window's
    # event-time bounds) against compiled windows: disabled seed, saved query, unit test and all.
    url = shop
    monkeypatch.setenv("SHOP_SCHEMA", "by_dbt")
    assert run_cli(*RANGE, "--chunk", "week", "--engine", "dbt", "--project-dir", str(shop_layout)) == 0
    assert "engine: dbt per window: --engine dbt" in err_lines(capfd)
    monkeypatch.setenv("SHOP_SCHEMA", "compiled")
    assert run_cli(*RANGE, "--chunk", "week", "--project-dir", str(shop_layout)) == 0
    capfd.readouterr()
    assert checksums(url, "by_dbt") == checksums(url, "compiled")
    assert checksums(url, "compiled")["orders"][0] == DAYS * 6 * len(STORES)


def test_the_target_is_printed_stored_and_a_separate_audit_database_named(
    shop: str,
    shop_layout: Path,
    pg_server: Any,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.conftest import create_database

    data_url = shop
    audit_url = register_url(create_database(pg_server, data_url.rsplit("/", 1)[1] + "_audit"))
    monkeypatch.setenv("DATABASE_URL", audit_url)
    data_db, audit_db = data_url.rsplit("/", 1)[1], audit_url.rsplit("/", 1)[1]
    port = data_url.rsplit(":", 1)[1].split("/")[0]

    assert run_cli(*RANGE, "--chunk", "day", "--dry-run", "--project-dir", str(shop_layout)) == 0
    lines = err_lines(capfd)
    target_line = (
        f"target: postgres 127.0.0.1:{port} database {data_db} schema jaffle"
        f" (profile jaffle_warehouse, target dev, {shop_layout / 'profiles.yml'})"
    )
    assert lines[:2] == [
        target_line,
        f"audit: rows go to 127.0.0.1:{port} database {audit_db} (DATABASE_URL), not to the target's database",
    ]
    assert not table_exists(data_url, "jaffle", "orders")

    # The hard-coded-profile defect: the data went to the profile's database, the audit row to
    # DATABASE_URL's, the compiled windows to DATABASE_URL's, and the run said "completed".
    assert run_cli("--start-date", "2024-01-02", "--end-date", "2024-01-04", "--chunk", "day",
                   "--models", "orders+", "order_items", "--project-dir", str(shop_layout)) == 0  # fmt: skip
    lines = err_lines(capfd)
    assert target_line in lines
    assert any(line.startswith("engine: compiled: dbt compiled 2 model(s)") for line in lines), lines
    [(orders,)] = query(data_url, "select count(*) from jaffle.orders")
    assert orders == 3 * 6 * len(STORES)
    assert not table_exists(audit_url, "jaffle", "orders")
    [row] = audit_rows(audit_url)
    assert row["status"] == "completed" and row["records_processed"] > 0
    assert row["target"] == {
        "profile": "jaffle_warehouse",
        "target": "dev",
        "adapter": "postgres",
        "host": "127.0.0.1",
        "port": int(port),
        "database": data_db,
        "schema": "jaffle",
    }
    assert not table_exists(data_url, "public", "backfill_executions")

    # --target picks another output of the project's own profile.
    assert run_cli("--start-date", "2024-01-02", "--end-date", "2024-01-02", "--models", "orders", "order_items",
                   "--target", "ci", "--project-dir", str(shop_layout)) == 0  # fmt: skip
    assert any(line.startswith("target: ") and "schema jaffle_ci (profile jaffle_warehouse, target ci" in line
               for line in err_lines(capfd))  # fmt: skip
    assert audit_rows(audit_url)[-1]["target"]["schema"] == "jaffle_ci"
    assert table_exists(data_url, "jaffle_ci", "orders")


def test_microbatch_models_get_each_windows_event_time_bounds(
    shop: str, shop_layout: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    url = shop
    # Only the microbatch model (and what it reads, once, to have rows): per window, dbt runs it
    # with --event-time-start/--event-time-end. Without them dbt would build every day from its
    # `begin` (2024-01-01) to today.
    assert run_cli(*RANGE, "--models", "orders", "order_items", "--project-dir", str(shop_layout)) == 0
    capfd.readouterr()
    assert run_cli("--start-date", "2024-01-03", "--end-date", "2024-01-05", "--chunk", "day",
                   "--models", "daily_store_revenue", "--project-dir", str(shop_layout)) == 0  # fmt: skip
    lines = err_lines(capfd)
    assert "engine: dbt per window: only microbatch models selected" in lines
    windows = [line for line in lines if line.startswith("window ")]
    assert [w.split(" rows=")[0] for w in windows] == [
        "window 1/3 2024-01-03..2024-01-03 ok",
        "window 2/3 2024-01-04..2024-01-04 ok",
        "window 3/3 2024-01-05..2024-01-05 ok",
    ]
    assert all(" rows=3 " in w for w in windows), windows  # one row per store from the batch results
    days = query(url, "select distinct order_date from jaffle.daily_store_revenue order by 1")
    assert [d for (d,) in days] == [date(2024, 1, 3), date(2024, 1, 4), date(2024, 1, 5)]
    [(revenue,)] = query(url, "select sum(revenue) from jaffle.daily_store_revenue")
    [(expected,)] = query(
        url, "select sum(order_total) from jaffle.orders where order_date between '2024-01-03' and '2024-01-05'"
    )
    assert revenue == expected
    assert audit_rows(url)[-1]["records_processed"] == 9

    # A microbatch model replaces whole batches, for every store: never one store's backfill.
    before = audit_rows(url)
    assert run_cli(*RANGE, "--tenant-id", "brooklyn", "--project-dir", str(shop_layout)) == EXIT_REFUSED
    [line] = err_lines(capfd)
    assert line.startswith("run_dbt_backfill: error: microbatch model(s) daily_store_revenue replace whole batches")
    assert audit_rows(url) == before
    # A chunk (it has an execution id) refused so is a failed row saying why; still no data touched.
    revenue_rows = query(url, "select * from jaffle.daily_store_revenue order by 1, 2")
    chunk = uuid.uuid4()
    assert run_cli(*RANGE, "--tenant-id", "brooklyn", "--execution-id", str(chunk),
                   "--project-dir", str(shop_layout)) == EXIT_REFUSED  # fmt: skip
    [refused] = err_lines(capfd)
    assert refused == line
    *_, row = audit_rows(url)
    assert (row["id"], row["status"], row["tenant_id"], row["records_processed"]) == (chunk, "failed", "brooklyn", 0)
    assert row["error_message"] == line.removeprefix("run_dbt_backfill: error: ")
    assert audit_rows(url)[:-1] == before
    assert query(url, "select * from jaffle.daily_store_revenue order by 1, 2") == revenue_rows
    # ... while the store-scoped models backfill one store and leave the others alone.
    execute(url, "update raw.order_items set quantity = 5 where order_id = 3")
    assert run_cli(*RANGE, "--tenant-id", "brooklyn", "--models", "orders", "order_items",
                   "--project-dir", str(shop_layout)) == 0  # fmt: skip
    totals = dict(query(url, "select store_id, sum(quantity) from jaffle.order_items where order_id = 3 group by 1"))
    raw = dict(query(url, "select store_id, sum(quantity) from raw.order_items where order_id = 3 group by 1"))
    assert totals["brooklyn"] == raw["brooklyn"]
    assert all(totals[s] != raw[s] for s in ("chicago", "philly"))


def test_no_project_is_one_line_and_exit_2(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    url = register_url(database_url)
    for key in ("DBT_PROJECT_DIR", "DBT_PROFILES_DIR", "DATABASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("DBT_TARGET_PATH", str(tmp_path / "target"))
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)  # neither a dbt project nor ./analytics here; the package ships none
    assert run_cli(*RANGE, "--database-url", url) == 2
    assert err_lines(capfd) == [
        f"run_dbt_backfill: error: no dbt project found in {empty} or {empty / 'analytics'}:"
        " pass --project-dir or set DBT_PROJECT_DIR"
    ]
    assert run_cli(*RANGE, "--database-url", url, "--project-dir", str(tmp_path / "nope")) == 2
    assert err_lines(capfd) == [
        f"run_dbt_backfill: error: no dbt project at {tmp_path / 'nope'} (from --project-dir):"
        " it has no dbt_project.yml"
    ]
    assert query(url, "select count(*) from information_schema.tables where table_schema <> 'pg_catalog'"
                 " and table_schema <> 'information_schema'") == [(0,)]  # fmt: skip


def test_a_missing_target_or_profile_is_one_line_and_exit_2(
    shop: str, shop_layout: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(*RANGE, "--target", "prod", "--project-dir", str(shop_layout)) == 2
    [line] = err_lines(capfd)
    assert line.startswith("run_dbt_backfill: error: profile 'jaffle_warehouse' in ")
    assert "does not have a target named 'prod'" in line
    assert run_cli(*RANGE, "--profiles-dir", str(tmp_path), "--project-dir", str(shop_layout)) == 2
    assert err_lines(capfd) == [f"run_dbt_backfill: error: no profiles.yml in {tmp_path} (from --profiles-dir)"]
    assert not table_exists(shop, "public", "backfill_executions")


def test_a_project_without_a_profile_connects_with_database_url(
    shop: str, shop_layout: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # The same project with its profiles.yml gone: the runner generates one from DATABASE_URL.
    project = tmp_path / "tests" / "projects" / "shop"
    shutil.copytree(shop_layout, project, ignore=shutil.ignore_patterns("dbt_packages", "target", "logs"))
    for part in ("tests/projects/shop_utils", "dbt-package"):
        shutil.copytree(shop_layout.parents[2] / part, tmp_path / part)
    (project / "profiles.yml").unlink()
    assert run_cli("--start-date", "2024-01-02", "--end-date", "2024-01-03", "--models", "orders", "order_items",
                   "--project-dir", str(project)) == 0  # fmt: skip
    lines = err_lines(capfd)
    [target] = [line for line in lines if line.startswith("target: ")]
    assert target.endswith(f"database {shop.rsplit('/', 1)[1]} schema analytics (profile jaffle_warehouse, target"
                           " backfill, generated from DATABASE_URL)")  # fmt: skip
    assert not any(line.startswith("audit: ") for line in lines)
    [(orders,)] = query(shop, "select count(*) from analytics.orders")
    assert orders == 2 * 6 * len(STORES)
    assert json.loads(json.dumps(audit_rows(shop)[-1]["target"]))["target"] == "backfill"
