"""How a run ends when it is stopped or loses its database, and what its audit row says then.

The runner runs as Kubernetes runs it: ``python -m scripts.run_dbt_backfill`` in a subprocess,
sent SIGTERM (what Kubernetes sends on suspend, cancel and deadlines) or cut off from its
database while its windows run. Each test waits for the first window's line before acting,
so the signal or the outage lands mid-run whatever the machine's speed.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, timedelta
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.integration.conftest import (
    audit_rows,
    db_state,
    execute,
    nonempty_lines,
    query,
    run_cli,
    run_tool,
    runner_env,
)

pytestmark = pytest.mark.integration

# Twenty day windows, one dbt invocation each: the run is still going when the test acts.
DAYS = ("--start-date", "2024-02-01", "--end-date", "2024-02-20", "--chunk", "day", "--engine", "dbt")
# Sixty day windows from the first day with orders, for the SIGTERM test: an in-process dbt window
# takes a fraction of a second, so twenty could all be done before the signal lands.
LONG_START = date(2024, 1, 20)
LONG_DAYS = ("--start-date", str(LONG_START), "--end-date", "2024-03-19", "--chunk", "day", "--engine", "dbt")


@pytest.fixture(autouse=True)
def _isolated(fresh_env: None, dispose_engines: None) -> None:
    """Clean env (no DATABASE_URL), private dbt target dir, engines disposed after."""


@contextmanager
def running(url: str, cli_env: Path, *argv: str) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """The runner in a subprocess, once its first window is done; yields it and its stderr so far."""
    with subprocess.Popen(
        [sys.executable, "-m", "scripts.run_dbt_backfill", *argv],
        cwd=REPO_ROOT,
        env=runner_env(url, cli_env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        lines: list[str] = []
        try:
            assert proc.stderr is not None
            for line in proc.stderr:
                lines.append(line.rstrip("\n"))
                if line.startswith("window 1/"):
                    break
            else:
                pytest.fail("the run ended before its first window:\n" + "\n".join(lines))
            yield proc, lines
        finally:
            if proc.poll() is None:
                proc.kill()


def finish(proc: subprocess.Popen[str], lines: list[str]) -> int:
    assert proc.stderr is not None
    lines.extend(line.rstrip("\n") for line in proc.stderr)
    return proc.wait(timeout=300)


def test_sigterm_ends_the_current_window_and_closes_the_row_as_cancelled(demo_url: str, cli_env: Path) -> None:
    execution_id = uuid.uuid4()
    with running(demo_url, cli_env, *LONG_DAYS, "--execution-id", str(execution_id)) as (proc, lines):
        [row] = audit_rows(demo_url)
        assert row["status"] == "running"
        assert row["heartbeat_at"] > row["created_at"]  # the first window beat
        proc.send_signal(signal.SIGTERM)
        code = finish(proc, lines)

    assert code == 143, "\n".join(lines)
    text = "\n".join(lines)
    assert "Traceback" not in text
    [summary] = [line for line in lines if line.startswith("backfill ")]
    assert summary.startswith("backfill cancelled: cancelled by SIGTERM after ")
    assert summary.endswith(f"/60 window(s) (execution {execution_id})")
    done = int(summary.removeprefix("backfill cancelled: cancelled by SIGTERM after ").split("/")[0])
    assert 1 <= done < 60, summary
    [row] = audit_rows(demo_url)
    assert row["status"] == "cancelled"
    assert row["error_message"].startswith("cancelled by SIGTERM after ")
    assert row["finished_at"] is not None and row["duration_seconds"] > 0
    # It stopped: only the windows it reports were written (the one running at SIGTERM included).
    [(last,)] = query(demo_url, "select max(order_date) from analytics.fact_orders")
    assert last is not None and LONG_START <= last < LONG_START + timedelta(days=done)


def test_a_lost_database_is_one_line_and_the_row_becomes_abandoned(
    demo_url: str, cli_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database = demo_url.rsplit("/", 1)[1]
    admin = demo_url.rsplit("/", 1)[0] + "/postgres"
    execution_id = uuid.uuid4()
    with running(demo_url, cli_env, *DAYS, "--execution-id", str(execution_id)) as (proc, lines):
        execute(admin, f'alter database "{database}" allow_connections false')
        execute(admin, "select pg_terminate_backend(pid) from pg_stat_activity where datname = %s", database)
        try:
            code = finish(proc, lines)
        finally:
            execute(admin, f'alter database "{database}" allow_connections true')

    text = "\n".join(lines)
    assert code == 1, text
    assert "Traceback" not in text
    [closing] = [line for line in lines if "audit row" in line]
    assert closing.startswith(f"error: the run ended failed but its audit row {execution_id} could not be closed (")
    assert "not currently accepting connections" in closing
    # Only what the run says about itself: a window line per window, dbt's error for the failed
    # one, the summary and that line; no log dump.
    assert len(nonempty_lines(text)) < 30, text

    [row] = audit_rows(demo_url)
    assert row["status"] == "running"  # nobody could close it
    execute(
        demo_url, "update backfill_executions set heartbeat_at = now() - interval '1 hour' where id = %s", execution_id
    )
    capsys.readouterr()
    assert run_tool("history", "--database-url", demo_url) == 0
    [shown] = [line for line in capsys.readouterr().out.splitlines() if str(execution_id) in line]
    assert " abandoned " in shown and " running " not in shown


FEB = ("--start-date", "2024-02-01", "--end-date", "2024-02-29")


def test_an_execution_id_of_another_run_exits_2_and_leaves_its_row(
    demo_url: str, capfd: pytest.CaptureFixture[str]
) -> None:
    execution_id = str(uuid.uuid4())
    assert run_cli(*FEB, "--execution-id", execution_id, "--database-url", demo_url) == 0
    before = db_state(demo_url)
    capfd.readouterr()

    others = {
        "range": ("--start-date", "2024-02-02", "--end-date", "2024-02-29"),
        "tenant": (*FEB, "--tenant-id", "tenant-001"),
        "models": (*FEB, "--models", "fact_orders"),
    }
    for what, other in others.items():
        assert run_cli(*other, "--execution-id", execution_id, "--database-url", demo_url) == 2, what
        lines = nonempty_lines(capfd.readouterr().err)
        # The target and plan lines, then the refusal: one error line, and no window ran.
        [error] = [line for line in lines if "error" in line.lower()]
        assert error == lines[-1], lines
        assert error.startswith(f"run_dbt_backfill: error: --execution-id: execution id {execution_id} already")
        assert not any(line.startswith(("window ", "engine: ")) for line in lines), lines
        assert db_state(demo_url) == before, what
