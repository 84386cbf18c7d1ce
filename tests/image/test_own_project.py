"""An image of one's own dbt project (deploy/examples/own-project/Dockerfile), from tests/projects/shop.

The recipe is built with podman on top of the operator image (``shop_image``), then a chunk runs
in it as the operator's Jobs run one: ``python -m scripts.run_dbt_backfill`` with the Job's
arguments, ``DATABASE_URL`` the only setting, read-only root, as 10001, /tmp a tmpfs, against the
session's real PostgreSQL on loopback. The shop's rows and the audit row are checked against raw.*.
"""

from __future__ import annotations

import uuid
from datetime import date, timedelta

import pytest
from psycopg import sql

from dbtbackfill.localpg import LocalPostgres
from tests.conftest import create_database
from tests.image.conftest import SHOP_BUILD_ARGS, Container
from tests.integration.conftest import audit_rows, query
from tests.integration.test_runner_cli import report
from tests.support.shop_data import STORES, load_shop_data

pytestmark = pytest.mark.image

START = date(2024, 1, 1)
PER_DAY = 6


def shop_rows(url: str, table: str, start: date, end: date) -> list[tuple[object, ...]]:
    """Per UTC day of ``table`` in schema jaffle (orders or raw.orders): (day, rows)."""
    stmt = sql.SQL(
        "select (ordered_at at time zone 'UTC')::date, count(*) from {} where (ordered_at at time zone 'UTC')::date"
        " between %s and %s group by 1 order by 1"
    ).format(sql.Identifier(*table.split(".")))
    return query(url, stmt, start, end)


def test_the_own_project_image_ships_the_shop_parsed_for_its_database(shop_container: Container) -> None:
    script = (
        "import json; m = json.load(open('/app/workspace/projects/shop/target/manifest.json'));"
        "print(m['metadata']['project_name'], sorted({n['database'] for n in m['nodes'].values()}),"
        " sorted({n['schema'] for n in m['nodes'].values() if n['resource_type'] == 'model'}))"
    )
    run = shop_container.run("python", "-c", script)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["jaffle_shop", f"['{SHOP_BUILD_ARGS['PARSE_DATABASE']}']", "['jaffle']"]
    # Both local packages installed at build time, owned by root: 10001 cannot change them.
    run = shop_container.run(
        "sh", "-c", "cd /app/workspace/projects/shop/dbt_packages && ls; touch dbt_backfill/x 2>/dev/null || echo ro"
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["dbt_backfill", "shop_utils", "ro"]


def test_a_chunk_of_the_shop_runs_in_its_own_image_and_reuses_the_build_time_parse(
    pg_server: LocalPostgres, shop_container: Container
) -> None:
    url = create_database(pg_server, SHOP_BUILD_ARGS["PARSE_DATABASE"])
    load_shop_data(url, start=START, days=6, per_day=PER_DAY)
    first, last = date(2024, 1, 2), date(2024, 1, 4)
    execution_id, parent_id = uuid.uuid4(), uuid.uuid4()

    run = shop_container.run(
        "python", "-m", "scripts.run_dbt_backfill",
        "--start-date", first.isoformat(), "--end-date", last.isoformat(), "--chunk", "day",
        "--execution-id", str(execution_id), "--parent-id", str(parent_id), "--chunk-index", "1", "--attempt", "1",
        env={"DATABASE_URL": url},
    )  # fmt: skip

    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    lines = run.stderr.splitlines()
    port = url.rsplit(":", 1)[1].split("/")[0]
    target = (
        f"target: postgres 127.0.0.1:{port} database shop_image schema jaffle"
        " (profile jaffle_warehouse, target backfill, /app/profile/profiles.yml)"
    )
    assert target in lines, run.stderr
    [parse] = [line for line in lines if line.startswith("parse: ")]
    assert parse.startswith("parse: reused the saved parse"), parse
    windows, summary = report(run.stderr)
    days = [first + timedelta(days=n) for n in range(3)]
    assert [(w.label, w.status) for w in windows] == [(f"{d}..{d}", "ok") for d in days]
    assert (summary.verdict, summary.done, summary.execution_id) == ("completed", 3, execution_id)

    # The chunk's days, and only those, as raw.* has them; the audit row says so too.
    assert shop_rows(url, "jaffle.orders", START, date(2024, 1, 6)) == [(d, PER_DAY * len(STORES)) for d in days]
    assert shop_rows(url, "jaffle.orders", first, last) == shop_rows(url, "raw.orders", first, last)
    [row] = audit_rows(url)
    assert (row["id"], row["parent_id"], row["kind"], row["status"]) == (execution_id, parent_id, "chunk", "completed")
    assert (row["start_date"], row["end_date"], row["records_processed"]) == (first, last, summary.rows)
    assert row["target"]["schema"] == "jaffle" and row["target"]["database"] == "shop_image"
    assert summary.rows > 0
