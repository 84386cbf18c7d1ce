"""``make demo-db``: a real PostgreSQL with the demo data, left running, that ``up`` finds again."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg
import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration


def demo_db(state_dir: Path, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scripts.demo_database", command, "--state-dir", str(state_dir)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def exports(stdout: str) -> dict[str, str]:
    return dict(re.findall(r"^export (\w+)=(\S+)$", stdout, re.M))


def test_up_leaves_a_server_with_demo_data_that_up_reuses_and_down_stops() -> None:
    # Not under pytest's temp root, which another session may reset to 0700 (see pg_server).
    state = Path(tempfile.mkdtemp(prefix="demo-db-")) / "postgres"
    first = demo_db(state, "up")
    try:
        assert first.returncode == 0, first.stderr
        urls = exports(first.stdout)
        assert set(urls) == {"WAREHOUSE_URL", "AUDIT_URL"}
        assert (state / "env").read_text() == first.stdout  # what `source .demo/postgres/env` reads
        assert urls["WAREHOUSE_URL"].endswith("/analytics") and urls["AUDIT_URL"].endswith("/audit")
        with psycopg.connect(urls["WAREHOUSE_URL"]) as conn:
            tenants, days = conn.execute(
                "select count(distinct tenant_id), count(distinct (ordered_at at time zone 'UTC')::date)"
                " from raw.orders"
            ).fetchone() or (0, 0)
            orders = conn.execute("select count(*) from raw.orders").fetchone()
        assert (tenants, days) == (3, 90)
        with psycopg.connect(urls["AUDIT_URL"]) as conn:  # exists, and holds no demo data
            assert conn.execute("select to_regclass('raw.orders')").fetchone() == (None,)

        again = demo_db(state, "up")  # the running server, not a second one: same URLs, same rows
        assert again.returncode == 0, again.stderr
        assert exports(again.stdout) == urls
        with psycopg.connect(urls["WAREHOUSE_URL"]) as conn:
            assert conn.execute("select count(*) from raw.orders").fetchone() == orders
    finally:
        down = demo_db(state, "down")
        shutil.rmtree(state.parent, ignore_errors=True)
    assert down.returncode == 0, down.stderr
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(urls["WAREHOUSE_URL"], connect_timeout=2)
