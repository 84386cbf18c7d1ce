"""A year of a project the runner did not ship with, in daily chunks, vs. a per-day ``dbt run`` loop.

``python -m benchmarks.shop_backfill [--days 366] [--per-day 20] [--naive-sample 10]``

The project is tests/projects/shop (jaffle-shop shaped: its own profile, two local packages,
versioned and contracted models, a child table without a date, a microbatch model, semantic
models, a disabled seed folder). On a throwaway PostgreSQL loaded with ``--days`` days of three
stores' orders, it times, as fresh processes:

* ``cli``: ``python -m scripts.run_dbt_backfill --chunk day --project-dir <shop>`` over the range
  (after one uncounted one-day run, as for any repeat run): the contract models run compiled, the
  microbatch model through dbt once over the range, batch by batch;
* ``naive``: ``dbt run --vars <day> --event-time-start <day> --event-time-end <day + 1>``, one
  process per day, timed on ``--naive-sample`` evenly spaced days and extrapolated, as
  ``benchmarks.backfill_speed`` does.

Both re-process existing tables (an uncounted full run creates them first). Writes
``benchmarks/results/shop_backfill.json`` and ``.md``; the target is naive / cli >= 30.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Final

import psycopg

from benchmarks.backfill_speed.commands import (
    SUMMARY_RE,
    Workdir,
    dbt_executable,
    r3,
    run_timed,
    sample_days,
)
from benchmarks.backfill_speed.report import environment_info
from benchmarks.backfill_speed.run import stop_server
from benchmarks.recording import REPO_ROOT, RESULTS_DIR, BenchmarkError, load_average, log, publish
from dbtbackfill.demo.localpg import LocalPostgres
from tests.support.shop_data import load_shop_data, shop_env

DEFAULT_OUT: Final = RESULTS_DIR / "shop_backfill.json"
START: Final = date(2024, 1, 1)
MIN_NAIVE_OVER_CLI: Final = 30.0
LAYOUT: Final = ("tests/projects/shop", "tests/projects/shop_utils", "dbt-package")


def copy_layout(dest: Path) -> Path:
    """The shop project and its two local packages, at the same relative paths; returns the project."""
    for part in LAYOUT:
        ignore = shutil.ignore_patterns("target", "logs", "dbt_packages", ".dbt-backfill-deps.lock")
        shutil.copytree(REPO_ROOT / part, dest / part, ignore=ignore)
    return dest / LAYOUT[0]


def dbt_day_argv(project: Path, day: date) -> list[str]:
    """What a shell loop runs for one day: the window's vars and the microbatch bounds."""
    window = json.dumps({"backfill_start_date": day.isoformat(), "backfill_end_date": day.isoformat()})
    bounds = ["--event-time-start", day.isoformat(), "--event-time-end", (day + timedelta(days=1)).isoformat()]
    return [*dbt_executable(), "run", "--project-dir", str(project), "--profiles-dir", str(project), "--vars", window,
            *bounds]  # fmt: skip


def cli_argv(project: Path, start: date, end: date) -> list[str]:
    return [sys.executable, "-m", "scripts.run_dbt_backfill", "--start-date", start.isoformat(),
            "--end-date", end.isoformat(), "--chunk", "day", "--project-dir", str(project)]  # fmt: skip


def measure(opts: argparse.Namespace, url: str, scratch: Path) -> dict[str, Any]:
    end = START + timedelta(days=opts.days - 1)
    environment = environment_info(url)
    orders = load_shop_data(url, start=START, days=opts.days, per_day=opts.per_day)
    log(f"loaded {orders} orders ({opts.days} days x 3 stores x {opts.per_day})")
    project = copy_layout(scratch / "layout")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DBT_", "SHOP_"))}
    env |= shop_env(url) | {"DATABASE_URL": url, "DBT_SEND_ANONYMOUS_USAGE_STATS": "false", "DO_NOT_TRACK": "1"}
    env |= {"DBT_LOG_PATH": str(scratch / "logs")}
    work = Workdir(REPO_ROOT, env, scratch / "target")

    # Uncounted: install the packages and create every table (the first window through dbt).
    setup = run_timed(cli_argv(project, START, START + timedelta(days=1)), work.with_target(scratch / "t-cli"), "setup")
    log(f"set-up run (dbt deps, tables created): {setup.wall_seconds:.1f}s")

    cli_work = work.with_target(scratch / "t-cli")
    load = load_average()
    run = run_timed(cli_argv(project, START, end), cli_work, "run_dbt_backfill --chunk day")
    summary = SUMMARY_RE.search(run.stderr)
    if summary is None or summary["verdict"] != "completed":
        raise BenchmarkError(f"the backfill did not complete:\n{run.stderr[-3000:]}")
    engines = [line for line in run.stderr.splitlines() if line.startswith(("engine: ", "microbatch "))]
    if not engines or not engines[0].startswith("engine: compiled:"):
        raise BenchmarkError(f"the windows did not run compiled: {engines}")
    with psycopg.connect(url) as conn:
        row = conn.execute("select count(*) from jaffle.orders").fetchone()
    if row is None or row[0] != orders:
        raise BenchmarkError(f"jaffle.orders holds {row} rows after the backfill, raw.orders {orders}")
    log(f"(cli) {run.wall_seconds:.1f}s wall for {summary['planned']} windows: {engines}")
    cli = {
        "command": "python -m scripts.run_dbt_backfill --start-date ... --end-date ... --chunk day --project-dir shop",
        "windows": int(summary["planned"]),
        "wall_seconds": r3(run.wall_seconds),
        "cpu_seconds": r3(run.cpu_seconds),
        "windows_seconds": float(summary["seconds"]),
        "rows": int(summary["rows"]),
        "engine_lines": engines,
        "load_average_1m_before": load,
    }

    naive_work = work.with_target(scratch / "t-naive")
    walls, cpus = [], []
    offsets = sample_days(opts.days, opts.naive_sample)
    for n, offset in enumerate(offsets, 1):
        day = START + timedelta(days=offset)
        one = run_timed(dbt_day_argv(project, day), naive_work, f"dbt run for {day}")
        walls.append(one.wall_seconds)
        cpus.append(one.cpu_seconds)
        log(f"(naive) dbt run {n}/{len(offsets)} ({day}): {one.wall_seconds:.2f}s")
    naive = {
        "command": "dbt run --vars '{backfill_start_date: <day>, backfill_end_date: <day>}'"
        " --event-time-start <day> --event-time-end <day + 1>, one process per day",
        "processes": opts.days,
        "sample_size": len(offsets),
        "wall_seconds": r3(statistics.fmean(walls) * opts.days),
        "cpu_seconds": r3(statistics.fmean(cpus) * opts.days),
        "per_window_wall_mean": r3(statistics.fmean(walls)),
        "samples_wall_seconds": [round(w, 2) for w in walls],
    }
    ratio = naive["wall_seconds"] / cli["wall_seconds"]
    environment["load_average_1m_at_end"] = load_average()
    return {
        "benchmark": "shop_backfill",
        "environment": environment,
        "config": {"days": opts.days, "stores": 3, "orders_per_store_day": opts.per_day, "start_date": str(START)},
        "data": {"orders": orders},
        "cli": cli,
        "naive": naive,
        "ratio": {
            "naive_over_cli": round(ratio, 1),
            "naive_over_cli_cpu": round(naive["cpu_seconds"] / cli["cpu_seconds"], 1),
            "target_at_least": MIN_NAIVE_OVER_CLI,
            "met": ratio >= MIN_NAIVE_OVER_CLI,
        },
    }


def render_markdown(results: dict[str, Any]) -> str:
    cli, naive, ratio, env = results["cli"], results["naive"], results["ratio"], results["environment"]
    days = results["config"]["days"]
    return "\n".join(
        [
            "# shop_backfill: a year of tests/projects/shop in daily chunks",
            "",
            f"{env['date']}, commit {env['git_commit']}, dbt-core {env['dbt_core']}, PostgreSQL {env['postgres']},"
            f" {env['cpus_usable']} CPUs, load {env['load_average_1m_at_start']} at start,"
            f" {env['load_average_1m_at_end']} at end. {results['data']['orders']:,} orders.",
            "",
            "| Variant | Wall time | Per window |",
            "|---|---:|---:|",
            f"| naive loop: one `dbt run` process per day, {days} processes (extrapolated from"
            f" {naive['sample_size']}) | {naive['wall_seconds']:,.0f} s | {naive['per_window_wall_mean']:.2f} s |",
            f"| `run_dbt_backfill --chunk day --project-dir shop` ({cli['windows']} windows, one process) |"
            f" {cli['wall_seconds']:.1f} s | {1000 * cli['wall_seconds'] / cli['windows']:.0f} ms |",
            "",
            f"naive / cli = **{ratio['naive_over_cli']}x** (target >= {ratio['target_at_least']:.0f}x:"
            f" {'met' if ratio['met'] else 'NOT met'}; {ratio['naive_over_cli_cpu']}x on CPU time).",
            "",
            "The CLI's engine lines: " + "; ".join(f"`{line}`" for line in cli["engine_lines"]),
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.shop_backfill", description=__doc__.split("\n")[0])
    parser.add_argument("--days", type=int, default=366, help="days from 2024-01-01 (default 366: the year 2024)")
    parser.add_argument("--per-day", type=int, default=20, help="orders per store per day (default 20)")
    parser.add_argument("--naive-sample", type=int, default=10, help="days of the per-day loop to time (default 10)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    opts = parser.parse_args(argv)
    if not 2 <= opts.naive_sample <= opts.days:
        parser.error("--naive-sample must be between 2 and --days")
    scratch = Path(tempfile.mkdtemp(prefix="dbtbackfill-shop-bench-"))
    server = LocalPostgres(scratch / "pg")
    try:
        url = server.start()
        results = measure(opts, url, scratch)
    except BenchmarkError as exc:
        log(f"error: {exc}")
        return 1
    finally:
        stop_server(server)
        shutil.rmtree(scratch, ignore_errors=True)
    publish(opts.out.stem, results, render_markdown, opts.out.parent)
    log(f"naive / cli = {results['ratio']['naive_over_cli']}x; wrote {opts.out}")
    return 0 if results["ratio"]["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
