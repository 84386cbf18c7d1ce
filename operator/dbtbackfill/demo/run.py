"""``make demo``: a real chunked backfill on a local PostgreSQL with demo data, in one command.

The backfill itself is the CLI's own ``run_backfill``, handed in by ``dbt-backfill demo``: the
demo runs exactly what a user types, and the demo package never imports the entry point.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import date, timedelta
from typing import Protocol

from dbtbackfill.core import audit
from dbtbackfill.demo.data import load_demo_data
from dbtbackfill.demo.localpg import LocalPostgres
from dbtbackfill.runner.progress import print_history

DEMO_START = date(2024, 1, 1)
DEMO_TENANTS = 3


class Backfill(Protocol):
    """The CLI's backfill command (:func:`dbtbackfill.cli.run_backfill`): argv in, exit code out."""

    def __call__(self, argv: Sequence[str] | None = None, prog: str = ...) -> int: ...


def run_demo(run_backfill: Backfill, database_url: str | None, days: int = 90) -> int:
    server: LocalPostgres | None = None
    if not database_url:
        print("demo: starting a throwaway PostgreSQL (set DATABASE_URL to use your own)", file=sys.stderr)
        server = LocalPostgres()
        database_url = server.start()
    try:
        counts = load_demo_data(database_url, tenants=DEMO_TENANTS, start_date=DEMO_START, days=days)
        print(f"demo: loaded {counts.customers} customers and {counts.orders} orders", file=sys.stderr)
        end = DEMO_START + timedelta(days=days - 1)
        common = ["--database-url", database_url, "--start-date", str(DEMO_START), "--end-date", str(end)]
        code = run_backfill([*common, "--chunk", "week"], prog="demo: backfill")
        if code == 0:
            # Tenant isolation: rebuild one tenant's first month only.
            month_end = min(end, DEMO_START + timedelta(days=30))
            code = run_backfill(
                ["--database-url", database_url, "--start-date", str(DEMO_START), "--end-date", str(month_end),
                 "--tenant-id", "tenant-001", "--chunk", "day", "--models", "facts+"],
                prog="demo: tenant backfill",
            )  # fmt: skip
        print_history(audit.history(audit.engine_for(database_url), limit=10))
        return code
    finally:
        audit.dispose_engines()
        if server is not None:
            server.stop()
