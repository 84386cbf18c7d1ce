"""``make demo-db``: a local PostgreSQL with the demo data that stays running, for the local cluster.

``python -m scripts.demo_database up [--state-dir DIR]`` starts PostgreSQL on a loopback port (the
same server ``make demo`` uses, but kept in ``DIR``, default ``.demo/postgres``, and left running),
creates two databases and prints the two URLs as ``export`` lines, also written to ``DIR/env``:

- ``WAREHOUSE_URL``: database ``analytics`` (the one the image's build-time parse is for) with the
  demo tenants' raw orders and customers, what the chunk Jobs build the models in;
- ``AUDIT_URL``: database ``audit``, for the audit log the operator and the chunks write.

Pods on the local cluster run on the host network, so they reach it on 127.0.0.1. Running ``up``
again reuses the running server (same port) and reloads the same demo rows. ``down`` stops it;
the data stays in ``DIR`` until you delete it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import psycopg

from dbtbackfill.demo.data import load_demo_data
from dbtbackfill.demo.localpg import LocalPostgres, LocalPostgresError, free_port
from dbtbackfill.demo.run import DEMO_START, DEMO_TENANTS

REPO_ROOT = Path(__file__).resolve().parents[1]
WAREHOUSE_DATABASE = "analytics"
AUDIT_DATABASE = "audit"
DEMO_DAYS = 90


def _server(state_dir: Path) -> LocalPostgres:
    port_file = state_dir / "port"
    port = int(port_file.read_text()) if port_file.exists() else free_port()
    return LocalPostgres(base_dir=state_dir, port=port)


def _running(server: LocalPostgres) -> bool:
    try:
        with psycopg.connect(server.url, connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False


def _pg_ctl(server: LocalPostgres, *args: str) -> subprocess.CompletedProcess[str]:
    # pg_ctl refuses to run as root; LocalPostgres runs the server as its own user then.
    prefix = ["runuser", "-u", server.user, "--"] if server.user else []
    argv = [*prefix, str(server.bin_dir / "pg_ctl"), "-D", str(server.data_dir), *args]
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def _database_url(server: LocalPostgres, name: str) -> str:
    return server.url.rsplit("/", 1)[0] + f"/{name}"


def up(state_dir: Path) -> int:
    state_dir.mkdir(parents=True, exist_ok=True)
    server = _server(state_dir)
    if not _running(server):
        server.start()
        (state_dir / "port").write_text(f"{server.port}\n")
    with psycopg.connect(server.url, autocommit=True) as conn:
        existing = {row[0] for row in conn.execute("select datname from pg_database")}
        for name in (WAREHOUSE_DATABASE, AUDIT_DATABASE):
            if name not in existing:
                conn.execute(f'create database "{name}"')
    warehouse, audit = _database_url(server, WAREHOUSE_DATABASE), _database_url(server, AUDIT_DATABASE)
    counts = load_demo_data(warehouse, tenants=DEMO_TENANTS, start_date=DEMO_START, days=DEMO_DAYS)
    end = DEMO_START + timedelta(days=DEMO_DAYS - 1)
    print(
        f"demo-db: PostgreSQL on 127.0.0.1:{server.port} (data in {state_dir}); {counts.orders} orders of "
        f"{DEMO_TENANTS} tenants, {DEMO_START}..{end}, in {WAREHOUSE_DATABASE}",
        file=sys.stderr,
    )
    exports = f"export WAREHOUSE_URL={warehouse}\nexport AUDIT_URL={audit}\n"
    (state_dir / "env").write_text(exports)
    print(exports, end="")
    return 0


def down(state_dir: Path) -> int:
    if not (state_dir / "data" / "PG_VERSION").exists():
        print(f"demo-db: no server in {state_dir}", file=sys.stderr)
        return 0
    server = _server(state_dir)
    if _running(server):
        stopped = _pg_ctl(server, "-m", "fast", "-w", "stop")
        if stopped.returncode != 0:
            print(f"demo-db: pg_ctl stop failed: {stopped.stderr.strip()}", file=sys.stderr)
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.demo_database", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("up", "down"))
    parser.add_argument("--state-dir", type=Path, default=REPO_ROOT / ".demo" / "postgres")
    args = parser.parse_args(argv)
    state_dir = args.state_dir.resolve()
    try:
        return up(state_dir) if args.command == "up" else down(state_dir)
    except LocalPostgresError as e:
        print(f"demo-db: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
