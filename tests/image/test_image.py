"""The built image itself: its size, its user, its read-only root, its version and a real chunk.

A chunk runs as the operator's Jobs run it (``python -m scripts.run_dbt_backfill``, read-only,
as 10001, ``DATABASE_URL`` from the environment) against the session's real PostgreSQL on
loopback, and its facts and audit row are checked against raw.* directly.
"""

from __future__ import annotations

import json
import subprocess
import tomllib
import uuid
from datetime import date

import pytest

from dbtbackfill.demo.localpg import LocalPostgres
from tests.conftest import REPO_ROOT, create_database
from tests.image.conftest import Container
from tests.integration.conftest import FACTS, audit_rows, load_demo, query
from tests.integration.test_runner_cli import raw_counts, report, window_days

pytestmark = pytest.mark.image

# Measured 491 MB on the Debian-bootstrapped base (python:3.11-slim-bookworm is smaller still);
# the bound catches a dev tool, a build cache or a second copy of the venv creeping in.
MAX_IMAGE_BYTES = 600_000_000
VERSION = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
# The image's build-time parse is for this database and schema (Dockerfile, parse_key.py).
PARSED_DATABASE = "analytics"


def inspect(image: str) -> dict[str, object]:
    out = subprocess.run(
        ["podman", "image", "inspect", image], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    [data] = json.loads(out)
    assert isinstance(data, dict)
    return data


def test_the_image_is_smaller_than_its_bound(image: str) -> None:
    size = inspect(image)["Size"]
    assert isinstance(size, int) and 0 < size < MAX_IMAGE_BYTES, size


def test_the_image_runs_as_10001_and_says_so_in_its_config(image: str, container: Container) -> None:
    config = inspect(image)["Config"]
    assert isinstance(config, dict) and config["User"] == "10001:10001"
    # No --user: the image's own user, as runAsNonRoot would verify it.
    run = container.run("sh", "-c", "id -u; id -g", user=None)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["10001", "10001"]


def test_the_root_is_read_only_and_tmp_is_writable(container: Container) -> None:
    script = "touch /app/x 2>/dev/null && echo app-writable; touch /opt/venv/x 2>/dev/null && echo venv-writable; "
    script += "mkdir -p /tmp/dbt/target && echo tmp-ok"
    run = container.run("sh", "-c", script)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["tmp-ok"]


def test_dbt_backfill_version_is_the_package_version(container: Container) -> None:
    run = container.run("dbt-backfill", "--version")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"dbt-backfill {VERSION}"


def test_the_image_ships_the_build_time_parse(container: Container) -> None:
    run = container.run(
        "python", "-c", "import json; m = json.load(open('/app/analytics/target/manifest.json'));"
        "print(sorted({n['database'] for n in m['nodes'].values()}), "
        "sorted(n['name'] for n in m['nodes'].values() if n['resource_type'] == 'model'))"
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    databases, models = run.stdout.strip().split("] [")
    assert databases == f"['{PARSED_DATABASE}'"
    assert {f"'{fact}'" for fact in FACTS} <= set(models.rstrip("]").split(", "))
    ls = container.run("test", "-s", "/app/analytics/target/partial_parse.msgpack")
    assert ls.returncode == 0


def run_chunk(container: Container, url: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return container.run("python", "-m", "scripts.run_dbt_backfill", *argv, env={"DATABASE_URL": url})


def test_a_daily_chunk_runs_in_the_image_and_reuses_its_parse(pg_server: LocalPostgres, container: Container) -> None:
    # The database the image was parsed for: the Pod's parse is the image's, not a new one.
    url = load_demo(create_database(pg_server, PARSED_DATABASE))
    execution_id, parent_id = uuid.uuid4(), uuid.uuid4()
    start, end = date(2024, 2, 6), date(2024, 2, 8)
    run = run_chunk(
        container, url,
        "--start-date", start.isoformat(), "--end-date", end.isoformat(), "--chunk", "day",
        "--execution-id", str(execution_id), "--parent-id", str(parent_id),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    parse_lines = [line for line in run.stderr.splitlines() if line.startswith("parse: ")]
    assert len(parse_lines) == 1 and parse_lines[0].startswith("parse: reused the saved parse"), run.stderr
    windows, summary = report(run.stderr)
    days = ("2024-02-06", "2024-02-07", "2024-02-08")
    assert [(w.label, w.status) for w in windows] == [(f"{d}..{d}", "ok") for d in days]
    assert (summary.verdict, summary.done, summary.execution_id) == ("completed", 3, execution_id)

    [row] = audit_rows(url)
    assert (row["id"], row["parent_id"], row["kind"], row["status"]) == (execution_id, parent_id, "chunk", "completed")
    assert (row["start_date"], row["end_date"], row["records_processed"]) == (start, end, summary.rows)
    expected = raw_counts(url, start, end)
    for table in FACTS:
        low, high, count = window_days(url, table)
        assert (low, high, count) == (start, end, expected[table]), table
    assert summary.rows == sum(expected.values())


def test_another_database_parses_afresh_and_still_writes_its_window(
    pg_server: LocalPostgres, container: Container
) -> None:
    # Nodes carry the database they were parsed for: another database must not reuse the parse.
    url = load_demo(create_database(pg_server, f"image_{uuid.uuid4().hex[:8]}"))
    run = run_chunk(container, url, "--start-date", "2024-02-10", "--end-date", "2024-02-10")
    assert run.returncode == 0, run.stderr
    [parse_line] = [line for line in run.stderr.splitlines() if line.startswith("parse: ")]
    assert parse_line.startswith("parse: full parse") and "profile has changed" in parse_line, parse_line
    assert query(url, "select count(*) from backfill_executions where status = 'completed'") == [(1,)]
    assert window_days(url, "fact_orders")[:2] == (date(2024, 2, 10), date(2024, 2, 10))
