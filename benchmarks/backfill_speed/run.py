"""``python -m benchmarks.backfill_speed``: its options, the order the variants run in, the clean-up.

The variants run in one go so that every number is taken under the same machine conditions, on a
throwaway PostgreSQL that is stopped and deleted at the end, also on Ctrl-C, SIGTERM or a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any, Final

from benchmarks.backfill_speed.commands import (
    ENGINE_DBT,
    START_DATE,
    Workdir,
    dbt_deps_argv,
    dbt_run_argv,
    r3,
    run_timed,
    shown,
    snapshot_project,
)
from benchmarks.backfill_speed.in_process import profile_in_process
from benchmarks.backfill_speed.report import (
    MAX_CLI_OVER_UNCHUNKED,
    MIN_NAIVE_OVER_CLI,
    compare,
    environment_info,
    render_markdown,
    verdicts,
)
from benchmarks.backfill_speed.variants import Unchunked, measure_cli, measure_imports, measure_naive
from benchmarks.recording import RESULTS_DIR, BenchmarkError, load_average, log, publish
from dbtbackfill.demo.data import load_demo_data
from dbtbackfill.demo.localpg import LocalPostgres
from dbtbackfill.runner.invocation import RunnerError, dbt_env

DESCRIPTION: Final = "How fast is a chunked backfill compared with one big ``dbt run`` and with a per-day shell loop?"
DEFAULT_OUT: Final = RESULTS_DIR / "backfill_speed.json"
NAIVE_FULL_UP_TO_DAYS: Final = 31
NAIVE_DEFAULT_SAMPLE: Final = 30


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def stop_server(server: LocalPostgres) -> None:
    """Stop PostgreSQL whatever state it is in; never raises."""
    with contextlib.suppress(Exception):
        server.stop()
    pid_file = server.data_dir / "postmaster.pid"
    with contextlib.suppress(Exception):
        if pid_file.exists():  # stop() failed or start() was interrupted half-way
            pid = int(pid_file.read_text().splitlines()[0])
            os.kill(pid, signal.SIGINT)  # PostgreSQL's "fast" shutdown
            deadline = time.monotonic() + 30
            while pid_file.exists() and time.monotonic() < deadline:
                time.sleep(0.2)


@dataclass
class Options:
    days: int
    tenants: int
    rows_per_day: int
    naive_sample: int
    unchunked_repeats: int
    profile_windows: int
    dbt_engine: bool
    extra_chunks: list[str]
    out: Path


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.backfill_speed", description=DESCRIPTION)
    parser.add_argument("--days", type=int, default=365, help="days from 2024-01-01 (default 365)")
    parser.add_argument("--tenants", type=int, default=3)
    parser.add_argument("--rows-per-day", type=int, default=50, help="orders per tenant per day (default 50)")
    parser.add_argument(
        "--naive-sample",
        type=int,
        default=None,
        metavar="N",
        help=f"time N evenly spaced days of the per-day loop and extrapolate "
        f"(default: every day if --days <= {NAIVE_FULL_UP_TO_DAYS}, else {NAIVE_DEFAULT_SAMPLE})",
    )
    parser.add_argument(
        "--unchunked-repeats",
        type=int,
        default=3,
        help="runs of (1), spread before, between and after (2) and (3); the median counts (default 3)",
    )
    parser.add_argument(
        "--profile-windows",
        type=int,
        default=20,
        help="--engine dbt windows to time phase by phase in-process (0: skip; the compiled engine's "
        "in-process timing always runs)",
    )
    parser.add_argument(
        "--no-dbt-engine",
        action="store_true",
        help="skip (3d), the CLI with --engine dbt (one dbt invocation per window: minutes for a year)",
    )
    parser.add_argument(
        "--extra-chunk",
        action="append",
        choices=("week", "month"),
        default=None,
        help="also run the CLI with this --chunk, for information, not for the targets "
        "(repeatable; default: week and month; --no-extra-chunks for none)",
    )
    parser.add_argument("--no-extra-chunks", action="store_true", help="skip --chunk week and month")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results; the .md goes next to it")
    args = parser.parse_args(argv)
    if args.days < 1 or args.tenants < 1 or args.rows_per_day < 1 or args.unchunked_repeats < 1:
        parser.error("--days, --tenants, --rows-per-day and --unchunked-repeats must be at least 1")
    if args.naive_sample is None:
        args.naive_sample = args.days if args.days <= NAIVE_FULL_UP_TO_DAYS else NAIVE_DEFAULT_SAMPLE
    if not 1 <= args.naive_sample <= args.days:
        parser.error("--naive-sample must be between 1 and --days")
    if args.profile_windows < 0:
        parser.error("--profile-windows must be 0 or more")
    return Options(
        days=args.days,
        tenants=args.tenants,
        rows_per_day=args.rows_per_day,
        naive_sample=args.naive_sample,
        unchunked_repeats=args.unchunked_repeats,
        profile_windows=args.profile_windows,
        dbt_engine=not args.no_dbt_engine,
        extra_chunks=[] if args.no_extra_chunks else (args.extra_chunk or ["week", "month"]),
        out=args.out,
    )


def subprocess_env(url: str, scratch: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DBT_PROJECT_DIR", "DBT_PROFILES_DIR", "DATABASE_URL")}
    env |= dbt_env(url)
    env |= {
        # Never the repo's analytics/target (other runs write there); each variant overrides this.
        "DBT_TARGET_PATH": str(scratch / "target"),
        "DBT_LOG_PATH": str(scratch / "logs"),
        "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
        "DO_NOT_TRACK": "1",
    }
    return env


def benchmark(opts: Options, url: str, scratch: Path) -> dict[str, Any]:
    start = START_DATE
    end = start + timedelta(days=opts.days - 1)
    environment = environment_info(url)
    log(f"loading demo data: {opts.days} days x {opts.tenants} tenants x {opts.rows_per_day} orders")
    began = time.perf_counter()
    counts = load_demo_data(url, tenants=opts.tenants, start_date=start, days=opts.days, rows_per_day=opts.rows_per_day)
    load_seconds = time.perf_counter() - began
    project = scratch / "project"
    project.mkdir()
    copied = snapshot_project(project)
    work = Workdir(cwd=project, env=subprocess_env(url, scratch), target=scratch / "target")
    deps = run_timed(dbt_deps_argv(), work, "dbt deps")
    log(f"dbt deps in the snapshot (not counted): {deps.wall_seconds:.2f}s")

    # Each variant has its own dbt target dir, warmed by one uncounted run: (1) then finds the
    # partial parse of its own vars, and each CLI run the parse its warm-up saved.
    runs = Unchunked(work.with_target(scratch / "target-unchunked"), start, end, opts.unchunked_repeats, [])
    warmup = run_timed(dbt_run_argv(start, end), runs.work, "warm-up dbt run")
    log(f"warm-up dbt run (creates the tables, not counted): {warmup.wall_seconds:.2f}s")
    runs.measure(0)
    naive = measure_naive(work.with_target(scratch / "target-naive"), start, opts.days, opts.naive_sample)
    naive["command"] = shown(dbt_run_argv(start, start), url).replace(start.isoformat(), "<day>")
    runs.measure(1)
    cli = measure_cli(work.with_target(scratch / "target-cli-day"), url, start, end)
    runs.measure(2)
    unchunked = runs.result()
    unchunked["command"] = shown(dbt_run_argv(start, end), url)
    cli_dbt = (
        measure_cli(work.with_target(scratch / "target-cli-day-dbt"), url, start, end, "day", ENGINE_DBT)
        if opts.dbt_engine
        else None
    )
    other_chunks = [
        measure_cli(work.with_target(scratch / f"target-cli-{chunk}"), url, start, end, chunk)
        for chunk in opts.extra_chunks
    ]
    for other in [*([cli_dbt] if cli_dbt else []), *other_chunks]:
        compare(other, unchunked, naive, cli)
    imports_seconds = measure_imports(work)
    in_process = profile_in_process(url, work, scratch, start, opts.days, opts.profile_windows)
    environment["load_average_1m_at_end"] = load_average()

    return {
        "benchmark": "backfill_speed",
        "environment": environment,
        "config": {
            "days": opts.days,
            "tenants": opts.tenants,
            "rows_per_day": opts.rows_per_day,
            "start_date": start.isoformat(),
            "end_date": end.isoformat(),
            "naive_sample": opts.naive_sample,
            "unchunked_repeats": opts.unchunked_repeats,
            "dbt_threads": work.env.get("DBT_THREADS", "4 (profiles.yml default)"),
            "project_snapshot": copied,
        },
        "data": {"customers": counts.customers, "orders": counts.orders, "load_seconds": r3(load_seconds)},
        "warmup_seconds": r3(warmup.wall_seconds),
        "unchunked": unchunked,
        "naive": naive,
        "cli": cli,
        "cli_dbt_engine": cli_dbt,
        "cli_other_chunks": other_chunks,
        "imports_seconds": imports_seconds,
        "ratios": verdicts(unchunked, naive, cli),
        "in_process": in_process,
        "notes": [
            "Before measuring, one unchunked dbt run creates the fact tables, so every variant measures incremental "
            "re-processing (delete+insert) of existing tables, not table creation.",
            "Wall times include process start-up: each variant is a fresh process, as a user would run it.",
            "(1) runs are spread before, between and after (2) and (3) (median counts), and reuse the warm-up's "
            "partial parse (same vars): dbt's best case. (2) passes different --vars to every process, so dbt "
            "re-parses the project every time (vars are part of dbt's partial-parse key).",
            "(3) runs after an uncounted one-day warm-up in its own target dir, so it parses once from the "
            "saved partial parse (as any repeat run on a checkout does), and with its default --engine auto "
            "has dbt compile the models once (the window as statement parameters $1/$2); every window then runs "
            "the prepared statements in one transaction. The benchmark fails if (3) ran fewer than all windows "
            "but one compiled (cli.engine_lines, cli.windows_compiled).",
            "(3d) is the same command with --engine dbt: one in-process dbt invocation per window on the parsed "
            "manifest, as every window ran before the compiled engine. It is a comparison, not part of the targets.",
            "Per-window times of the CLI runs are the gaps between the arrival of its window lines on stderr "
            "(each line is flushed as the window ends); the lines' own seconds have a 10 ms resolution. "
            "windows_seconds is the CLI's summary line, which with the compiled engine includes the one compile.",
            "CPU times are the client process and its children (dbt, Python); PostgreSQL's own CPU is not included.",
            "Commands run in a snapshot of analytics/ and scripts/ (git-tracked files) so that other runs' "
            "untracked models and target/ writes cannot leak in; each variant has its own dbt target dir.",
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    # Ctrl-C, kill and a closed terminal all end up in the clean-up below (SIGINT too when started ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    scratch = Path(tempfile.mkdtemp(prefix="dbtbackfill-bench-"))
    server: LocalPostgres | None = None
    try:
        server = LocalPostgres(scratch / "pg")
        log(f"starting a throwaway PostgreSQL in {server.base_dir}")
        url = server.start()
        results = benchmark(opts, url, scratch)
    except KeyboardInterrupt:
        log("interrupted: stopping PostgreSQL, nothing written")
        return 130
    except (BenchmarkError, RunnerError) as exc:
        log(f"error: {exc}")
        return 1
    finally:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the clean-up
        if server is not None:
            stop_server(server)
        shutil.rmtree(scratch, ignore_errors=True)
        signal.signal(signal.SIGINT, previous)

    publish(opts.out.stem, results, render_markdown, opts.out.parent)
    targets = results["ratios"]["targets"]
    log(
        f"(3)/(1) = {results['ratios']['cli_over_unchunked']:.2f}x (target <= {MAX_CLI_OVER_UNCHUNKED}x: "
        f"{'met' if targets['cli_over_unchunked_met'] else 'NOT met'}); "
        f"(2)/(3) = {results['ratios']['naive_over_cli']:.1f}x (target >= {MIN_NAIVE_OVER_CLI:.0f}x: "
        f"{'met' if targets['naive_over_cli_met'] else 'NOT met'}); wrote {opts.out} and {opts.out.with_suffix('.md')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
