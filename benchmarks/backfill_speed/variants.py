"""The variants ``backfill_speed`` compares, each run as fresh processes: (1) one unchunked ``dbt run``,
(2) one ``dbt run`` per day, (3) the chunked CLI (with either engine, any ``--chunk``).

Each returns the JSON its part of the results holds; ``measure_cli`` also refuses a run whose
windows did not run on the engine it is meant to measure (see ``check_engine``).
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, Final

import psycopg

from benchmarks.backfill_speed.commands import (
    ENGINE_COMPILED,
    ENGINE_DBT,
    ENGINE_PREFIX,
    PLAN_PREFIX,
    SUMMARY_RE,
    WINDOW_RE,
    Workdir,
    cli_argv,
    dbt_run_argv,
    r3,
    r5,
    run_results_rows,
    run_timed,
    sample_days,
    shown,
)
from benchmarks.recording import BenchmarkError, load_average, log, median, nearest_rank

#: (1) is run in these slots, round robin, so that its median sees the same drifting machine load as (2) and (3).
UNCHUNKED_SLOTS: Final = ("before (2)", "between (2) and (3)", "after (3)")


def unchunked_runs_in_slot(slot: int, repeats: int) -> int:
    return len([i for i in range(repeats) if i % len(UNCHUNKED_SLOTS) == slot])


@dataclass
class Unchunked:
    """Samples of (1), taken a few at a time between the other variants."""

    work: Workdir
    start: date
    end: date
    repeats: int
    samples: list[dict[str, Any]]
    rows: int = 0

    def measure(self, slot: int) -> None:
        for _ in range(unchunked_runs_in_slot(slot, self.repeats)):
            load = load_average()
            run = run_timed(dbt_run_argv(self.start, self.end), self.work, "unchunked dbt run")
            self.rows = run_results_rows(self.work.target)
            self.samples.append(
                {
                    "slot": UNCHUNKED_SLOTS[slot],
                    "wall_seconds": r3(run.wall_seconds),
                    "cpu_seconds": r3(run.cpu_seconds),
                    "load_average_1m_before": load,
                }
            )
            log(
                f"(1) unchunked dbt run {len(self.samples)}/{self.repeats} ({UNCHUNKED_SLOTS[slot]}): "
                f"{run.wall_seconds:.2f}s wall, {run.cpu_seconds:.2f}s CPU"
            )

    def result(self) -> dict[str, Any]:
        return {
            "processes": 1,
            "windows": 1,
            "wall_seconds": median(s["wall_seconds"] for s in self.samples),
            "cpu_seconds": median(s["cpu_seconds"] for s in self.samples),
            "rows": self.rows,
            "samples": self.samples,
        }


def measure_naive(work: Workdir, start: date, days: int, sample: int) -> dict[str, Any]:
    offsets = sample_days(days, sample)
    load = load_average()
    walls: list[float] = []
    cpus: list[float] = []
    rows = 0
    for n, offset in enumerate(offsets, 1):
        day = start + timedelta(days=offset)
        run = run_timed(dbt_run_argv(day, day), work, f"dbt run for {day}")
        walls.append(run.wall_seconds)
        cpus.append(run.cpu_seconds)
        rows += run_results_rows(work.target)
        log(f"(2) naive dbt run {n}/{len(offsets)} ({day}): {run.wall_seconds:.2f}s wall, {run.cpu_seconds:.2f}s CPU")
    mean_wall = statistics.fmean(walls)
    mean_cpu = statistics.fmean(cpus)
    extrapolated = len(offsets) < days
    return {
        "processes": days,
        "windows": days,
        "sample_size": len(offsets),
        "extrapolated": extrapolated,
        "sampled_days": [(start + timedelta(days=o)).isoformat() for o in offsets],
        "wall_seconds": r3(mean_wall * days),
        "cpu_seconds": r3(mean_cpu * days),
        "per_window_wall_mean": r3(mean_wall),
        "per_window_wall_stdev": r3(statistics.stdev(walls)) if len(walls) > 1 else 0.0,
        "per_window_wall_min": r3(min(walls)),
        "per_window_wall_max": r3(max(walls)),
        "per_window_cpu_mean": r3(mean_cpu),
        "samples_wall_seconds": [round(w, 2) for w in walls],
        "samples_cpu_seconds": [round(c, 2) for c in cpus],
        "rows_sampled_days": rows,
        "rows_extrapolated": round(rows / len(offsets) * days) if extrapolated else rows,
        "load_average_1m_before": load,
    }


def audit_rows(url: str, execution_id: str) -> tuple[int | None, float | None]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "select records_processed, duration_seconds from backfill_executions where id = %s", (execution_id,)
        ).fetchone()
    return (row[0], row[1]) if row else (None, None)


def cli_timeline(lines: Sequence[tuple[float, str]], wall: float) -> dict[str, Any]:
    """Which engine ran each window, and the run's phases, from the arrival times of the CLI's lines.

    Each window's ``gap`` is the time from the previous window's line (or the engine line that
    precedes it) to its own: the window's work plus printing one line. The windows' own
    ``seconds`` on their lines have a 10 ms resolution, too coarse for compiled windows.
    """
    plan_at: float | None = None
    summary_at: float | None = None
    engines: list[dict[str, Any]] = []
    windows: list[dict[str, Any]] = []
    engine: str | None = None
    mark = 0.0  # arrival of the last plan, engine or window line
    for at, line in lines:
        if line.startswith(PLAN_PREFIX) and plan_at is None:
            plan_at = mark = at
        elif line.startswith(ENGINE_PREFIX):
            text = line.removeprefix(ENGINE_PREFIX)
            engine = ENGINE_COMPILED if text.startswith(ENGINE_COMPILED + ":") else ENGINE_DBT
            engines.append({"at_seconds": r3(at), "engine": engine, "line": line})
            mark = at
        elif WINDOW_RE.fullmatch(line) is not None:
            windows.append({"engine": engine, "gap": at - mark, "at": at})
            mark = at
        elif SUMMARY_RE.search(line):
            summary_at = at
    if plan_at is None or not windows or summary_at is None:
        raise BenchmarkError("run_dbt_backfill printed no plan, window or summary lines to time")
    gaps = [w["gap"] for w in windows]
    first_mark = windows[0]["at"] - windows[0]["gap"]  # the engine line just before the first window
    windows_wall = sum(gaps)
    tenths = [gaps[i * len(gaps) // 10 : (i + 1) * len(gaps) // 10] for i in range(10)]
    return {
        "engine_lines": engines,
        "windows_compiled": sum(w["engine"] == ENGINE_COMPILED for w in windows),
        "windows_dbt": sum(w["engine"] != ENGINE_COMPILED for w in windows),
        # Process start to the `plan:` line: interpreter, imports, connection check, dbt parse, `dbt ls`.
        "before_plan_seconds": r3(plan_at),
        # `plan:` line to the engine line before the first window: audit-table set-up, and with the
        # compiled engine the one `dbt compile` of the selected models and preparing their statements.
        "plan_to_first_window_seconds": r3(first_mark - plan_at),
        # Sum of the windows' gaps.
        "windows_wall_seconds": r3(windows_wall),
        # Between the first window and the last, outside any window: e.g. the compile after a
        # table-creating first window run by dbt. 0 when the engine line comes before all windows.
        "between_windows_seconds": r3(windows[-1]["at"] - first_mark - windows_wall),
        # Last window line to the summary line: the audit row's finish.
        "last_window_to_summary_seconds": r3(summary_at - windows[-1]["at"]),
        # Summary line to the process's exit: closing connections, interpreter teardown.
        "summary_to_exit_seconds": r3(wall - summary_at),
        "per_window_wall_mean": r5(statistics.fmean(gaps)),
        "per_window_wall_median": median(gaps, 5),
        "per_window_wall_p90": r5(nearest_rank(gaps, 90)),
        "per_window_wall_max": r5(max(gaps)),
        # Mean per tenth of the run, in order: a trend means the process slows down (or the machine's load moved).
        "per_window_wall_mean_by_tenth": [r5(statistics.fmean(part)) for part in tenths if part],
    }


def check_engine(result: dict[str, Any], expected: str, what: str) -> None:
    """BenchmarkError unless the run used the engine it is meant to measure.

    Compiled: every window, or all but a first one that dbt ran to create missing tables.
    dbt: no window compiled.
    """
    compiled, planned = result["windows_compiled"], result["windows"]
    lines = "; ".join(e["line"] for e in result["engine_lines"]) or "no engine line"
    if expected == ENGINE_COMPILED and compiled < max(1, planned - 1):
        raise BenchmarkError(
            f"{what} ran {compiled} of {planned} window(s) with the compiled engine, so it does not measure "
            f"that engine ({lines})"
        )
    if expected == ENGINE_DBT and (compiled or not result["engine_lines"]):
        raise BenchmarkError(f"{what} did not run one dbt invocation per window ({lines})")


def measure_cli(
    work: Workdir, url: str, start: date, end: date, chunk: str = "day", engine: str | None = None
) -> dict[str, Any]:
    """One run of the CLI; ``engine=None`` is its default (auto), which must run compiled.

    A one-day run first (not counted) leaves dbt's partial parse in the variant's target dir,
    as any earlier run does for a user on a checkout: (1) gets the same from its warm-up.
    """
    warmup = run_timed(cli_argv(start, start, url, chunk, engine), work, "warm-up CLI run")
    argv = cli_argv(start, end, url, chunk, engine)
    what = shown(argv, url)
    load = load_average()
    run = run_timed(argv, work, what)
    output = run.stdout + "\n" + run.stderr
    summary = SUMMARY_RE.search(output)
    if summary is None or summary["verdict"] != "completed":
        raise BenchmarkError(f"run_dbt_backfill printed no 'backfill completed' summary:\n{output[-3000:]}")
    planned = int(summary["planned"])
    windows_seconds = float(summary["seconds"])
    recorded_rows, recorded_seconds = audit_rows(url, summary["execution"])
    timeline = cli_timeline(run.stderr_lines, run.wall_seconds)
    result: dict[str, Any] = {
        "chunk": chunk,
        "engine": engine or "auto",
        "command": what,
        "processes": 1,
        "windows": planned,
        "wall_seconds": r3(run.wall_seconds),
        "cpu_seconds": r3(run.cpu_seconds),
        "rows": int(summary["rows"]),
        "rows_audit_table": recorded_rows,
        # The CLI's own count, from its summary line: all of run_windows, so with the compiled
        # engine the one compile and the statements' preparation too.
        "windows_seconds": windows_seconds,
        "windows_seconds_audit_table": recorded_seconds,
        "startup_seconds": r3(run.wall_seconds - windows_seconds),
        "load_average_1m_before": load,
        "warmup_seconds": r3(warmup.wall_seconds),
        **timeline,
    }
    check_engine(result, ENGINE_DBT if engine == ENGINE_DBT else ENGINE_COMPILED, what)
    log(
        f"run_dbt_backfill --chunk {chunk} --engine {result['engine']}: {run.wall_seconds:.2f}s wall, "
        f"{timeline['windows_wall_seconds']:.2f}s in {planned} windows "
        f"({timeline['windows_compiled']} compiled, {timeline['windows_dbt']} by dbt)"
    )
    return result


def measure_imports(work: Workdir, repeats: int = 3) -> float:
    """A fresh interpreter importing what the CLI imports before its first window (no parse, no SQL); median."""
    code = (
        "import dbtbackfill.cli, dbtbackfill.core.audit, dbt.cli.main, dbt.adapters.postgres.impl, sqlalchemy, psycopg"
    )
    walls = [run_timed([sys.executable, "-c", code], work, "import timing").wall_seconds for _ in range(repeats)]
    return median(walls)
