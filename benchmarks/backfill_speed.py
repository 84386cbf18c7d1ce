"""How fast is a chunked backfill compared with one big ``dbt run`` and with a per-day shell loop?

``python -m benchmarks.backfill_speed [--days 365] [--tenants 3] [--rows-per-day 50] [--naive-sample N]``

On a throwaway local PostgreSQL (started and stopped here, also on Ctrl-C/SIGTERM) loaded with the
demo data, it measures, in one run so the numbers share the machine's conditions:

1. ``unchunked``: one ``dbt run`` over the whole range, as a fresh process, as a user would type it;
2. ``naive``: one ``dbt run`` process per day (a sample of days, extrapolated to all days);
3. ``cli``: ``python -m scripts.run_dbt_backfill --chunk day`` over the whole range, as a fresh process,
   with its default ``--engine auto`` (dbt compiles the models once, each window runs that SQL in one
   transaction); the benchmark fails unless (almost) every window really ran compiled;
   (3d) the same with ``--engine dbt`` (one in-process dbt invocation per window, the previous design),
   and, for comparison only, ``--chunk week`` and ``--chunk month``;

then, in this process, where the time goes: the compiled engine (the one compile, then SQL per window)
and the ``--engine dbt`` path (dbt set-up per invocation vs. SQL per model). Writes
``benchmarks/results/backfill_speed.json`` and a Markdown table next to it. See
``benchmarks/README.md`` for what each number means.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import importlib
import importlib.metadata
import io
import json
import math
import os
import platform
import pstats
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import IO, Any, Final

import psycopg

from dbtbackfill.demo.data import load_demo_data
from dbtbackfill.demo.localpg import LocalPostgres
from dbtbackfill.runner.invocation import RunnerError, dbt_env

REPO_ROOT: Final = Path(__file__).resolve().parents[1]
DEFAULT_OUT: Final = REPO_ROOT / "benchmarks" / "results" / "backfill_speed.json"
START_DATE: Final = date(2024, 1, 1)
#: The project's targets: the chunked CLI within 1.5x of one unchunked run, and 10x faster than a per-day loop.
MAX_CLI_OVER_UNCHUNKED: Final = 1.5
MIN_NAIVE_OVER_CLI: Final = 10.0
NAIVE_FULL_UP_TO_DAYS: Final = 31
NAIVE_DEFAULT_SAMPLE: Final = 30

SUMMARY_RE: Final = re.compile(
    r"backfill (?P<verdict>completed|FAILED): (?P<done>\d+)/(?P<planned>\d+) window\(s\)"
    r"(?:, \d+ window\(s\) not attempted)?, (?P<rows>\d+) row\(s\), (?P<seconds>[0-9.]+)s"
    r" \(execution (?P<execution>[0-9a-f-]{36})\)"
)
WINDOW_RE: Final = re.compile(r"window \d+/\d+ \S+ (?P<status>ok|FAILED) rows=(?P<rows>\d+) (?P<seconds>[0-9.]+)s")
#: What the CLI prints (on stderr, one flushed line each) around its windows.
PLAN_PREFIX: Final = "plan: "
ENGINE_PREFIX: Final = "engine: "
ENGINE_COMPILED: Final = "compiled"
ENGINE_DBT: Final = "dbt"


class BenchmarkError(RuntimeError):
    """A measured command failed: the numbers would be meaningless."""


# ---------------------------------------------------------------- running and timing processes


@dataclass(frozen=True)
class Workdir:
    """Where the measured commands run: a snapshot of the project, its environment, dbt's target dir."""

    cwd: Path
    env: dict[str, str]
    target: Path

    def with_target(self, target: Path) -> Workdir:
        """The same, with its own dbt target dir (each holds its own partial-parse state)."""
        return Workdir(self.cwd, self.env | {"DBT_TARGET_PATH": str(target)}, target)


def snapshot_project(dest: Path) -> str:
    """Copy ``analytics/`` and ``scripts/`` to ``dest``; returns what was copied.

    The commands run against a snapshot, not the live tree: other people's runs leave
    untracked models in ``analytics/models`` and write to ``analytics/target``.
    """
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--", "analytics", "scripts"], cwd=REPO_ROOT, capture_output=True, check=True
        ).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        listed = ""
    files = [f for f in listed.split("\0") if f and (REPO_ROOT / f).is_file()]
    if files:
        for rel in files:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / rel, dest / rel)
        return "git-tracked files of analytics/ and scripts/ (working-tree content)"
    for name in ("analytics", "scripts"):
        ignore = shutil.ignore_patterns("target", "logs", "dbt_packages", "__pycache__")
        shutil.copytree(REPO_ROOT / name, dest / name, ignore=ignore)
    return "analytics/ and scripts/ without target/, logs/, dbt_packages/"


@dataclass(frozen=True)
class ProcessRun:
    wall_seconds: float
    #: user + system CPU of the process and its children (not of the PostgreSQL server).
    cpu_seconds: float
    stdout: str
    stderr: str
    #: ``(seconds since the process started, line)`` for each stderr line, as it arrived: the CLI
    #: flushes every line it prints, so these time its phases from the outside.
    stderr_lines: tuple[tuple[float, str], ...] = ()


def _drain(stream: IO[str], started: float, into: list[tuple[float, str]]) -> None:
    for line in iter(stream.readline, ""):
        into.append((time.perf_counter() - started, line.rstrip("\n")))


def run_timed(argv: Sequence[str], work: Workdir, what: str) -> ProcessRun:
    """Run ``argv`` in the snapshot; wall and CPU time, or BenchmarkError on failure."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    out: list[tuple[float, str]] = []
    err: list[tuple[float, str]] = []
    proc = subprocess.Popen(
        list(argv), cwd=work.cwd, env=work.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        readers = [
            threading.Thread(target=_drain, args=(stream, started, lines), daemon=True)
            for stream, lines in ((proc.stdout, out), (proc.stderr, err))
        ]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join()
        returncode = proc.wait()
    except BaseException:  # Ctrl-C or SIGTERM: no orphan keeps writing to the database being torn down
        proc.kill()
        proc.wait()
        raise
    finally:
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    stdout = "\n".join(line for _, line in out)
    stderr = "\n".join(line for _, line in err)
    if returncode != 0:
        tail = (stdout[-3000:] + "\n" + stderr[-3000:]).strip()
        raise BenchmarkError(f"{what} failed with exit code {returncode}:\n{tail}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return ProcessRun(wall, cpu, stdout, stderr, tuple(err))


def dbt_executable() -> list[str]:
    beside = Path(sys.executable).with_name("dbt")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("dbt")
    if found is None:
        raise BenchmarkError("no `dbt` executable next to this Python or on PATH")
    return [found]


def dbt_vars(start: date, end: date) -> str:
    return json.dumps(
        {"backfill_start_date": start.isoformat(), "backfill_end_date": end.isoformat(), "tenant_id": None}
    )


def dbt_run_argv(start: date, end: date) -> list[str]:
    return [
        *dbt_executable(),
        "run",
        "--project-dir",
        "analytics",
        "--profiles-dir",
        "analytics",
        "--vars",
        dbt_vars(start, end),
    ]


def cli_argv(start: date, end: date, url: str, chunk: str = "day", engine: str | None = None) -> list[str]:
    """The CLI's command line; ``engine=None`` leaves ``--engine`` at its default (auto)."""
    argv = [
        sys.executable,
        "-m",
        "scripts.run_dbt_backfill",
        "--start-date",
        start.isoformat(),
        "--end-date",
        end.isoformat(),
        "--chunk",
        chunk,
        "--database-url",
        url,
    ]
    return [*argv, "--engine", engine] if engine else argv


def shown(argv: Sequence[str], url: str) -> str:
    """A command line for the report: no local paths, no throwaway URL."""
    parts = [Path(argv[0]).name if i == 0 else a for i, a in enumerate(argv)]
    if parts[0].startswith("python"):
        parts[0] = "python"
    text = " ".join(f"'{p}'" if p.startswith("{") else p for p in parts)
    return text.replace(url, "$DATABASE_URL")


def run_results_rows(target_path: Path) -> int:
    """Rows inserted by the last ``dbt run`` (sum of rows_affected in run_results.json)."""
    data = json.loads((target_path / "run_results.json").read_text())
    total = 0
    for result in data["results"]:
        if result["status"] != "success":
            raise BenchmarkError(f"{result['unique_id']} ended {result['status']}")
        rows = (result.get("adapter_response") or {}).get("rows_affected")
        total += rows if isinstance(rows, int) and rows > 0 else 0
    return total


def sample_days(days: int, sample: int) -> list[int]:
    """``sample`` evenly spaced day offsets in ``range(days)``, first and last included."""
    if sample >= days:
        return list(range(days))
    if sample == 1:
        return [days // 2]
    return sorted({round(i * (days - 1) / (sample - 1)) for i in range(sample)})


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))
    return ordered[rank]


def r3(value: float) -> float:
    return round(value, 3)


def r5(value: float) -> float:
    """For per-window times of a few milliseconds."""
    return round(value, 5)


# ---------------------------------------------------------------- the three variants


def load_1m() -> float:
    return round(os.getloadavg()[0], 2)


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
            load = load_1m()
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
            "wall_seconds": r3(statistics.median(s["wall_seconds"] for s in self.samples)),
            "cpu_seconds": r3(statistics.median(s["cpu_seconds"] for s in self.samples)),
            "rows": self.rows,
            "samples": self.samples,
        }


def measure_naive(work: Workdir, start: date, days: int, sample: int) -> dict[str, Any]:
    offsets = sample_days(days, sample)
    load = load_1m()
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
        "per_window_wall_median": r5(statistics.median(gaps)),
        "per_window_wall_p90": r5(percentile(gaps, 0.9)),
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
    load = load_1m()
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
    return r3(statistics.median(walls))


# ---------------------------------------------------------------- where one window's time goes (in-process)


class PhaseTimer:
    """Accumulates wall time per phase across threads (dbt runs models on a thread pool)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._saved: list[tuple[Any, str, Any]] = []

    def add(self, key: str, seconds: float) -> None:
        with self._lock:
            self.seconds[key] = self.seconds.get(key, 0.0) + seconds
            self.calls[key] = self.calls.get(key, 0) + 1

    def reset(self) -> None:
        with self._lock:
            self.seconds.clear()
            self.calls.clear()

    def _wrap(self, key: str, func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                self.add(key, time.perf_counter() - started)

        return timed

    def patch(self, key: str, module: str, attribute: str) -> None:
        """Time ``module.attribute`` (``Class.method`` allowed, classmethods included)."""
        owner: Any = importlib.import_module(module)
        *path, name = attribute.split(".")
        for part in path:
            owner = getattr(owner, part)
        raw = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        self._saved.append((owner, name, raw))
        if isinstance(raw, classmethod):
            setattr(owner, name, classmethod(self._wrap(key, raw.__func__)))
        else:
            setattr(owner, name, self._wrap(key, raw))

    def restore(self) -> None:
        for owner, name, raw in reversed(self._saved):
            setattr(owner, name, raw)
        self._saved.clear()


#: (phase, module, attribute, where it runs, what it is). Phases may nest; see README.
PHASES: Final = (
    ("invoke", "dbt.cli.main", "dbtRunner.invoke", "main", "one dbtRunner.invoke: everything dbt does for a window"),
    (
        "manifest_copy",
        "dbt.contracts.graph.manifest",
        "Manifest.deepcopy",
        "main",
        "runner's copy of the parsed manifest",
    ),
    ("event_logger", "dbt.cli.requires", "setup_event_logger", "main", "dbt re-creates its loggers"),
    ("load_profile", "dbt.cli.requires", "load_profile", "main", "profiles.yml read and rendered"),
    ("load_project", "dbt.cli.requires", "load_project", "main", "dbt_project.yml read and rendered"),
    ("plugin_manager", "dbt.cli.requires", "set_up_plugin_manager", "main", "scans installed modules for dbt plugins"),
    ("runtime_config", "dbt.config.runtime", "RuntimeConfig.from_parts", "main", "RuntimeConfig built"),
    ("register_adapter", "dbt.cli.requires", "register_adapter", "main", "new Postgres adapter"),
    ("before_run", "dbt.task.run", "RunTask.before_run", "main", "create schemas, relation cache, on-run-start"),
    ("execute_nodes", "dbt.task.runnable", "GraphRunnableTask.execute_nodes", "main", "thread pool running models"),
    ("after_run", "dbt.task.run", "RunTask.after_run", "main", "on-run-end, connection clean-up"),
    ("model_total", "dbt.task.runnable", "GraphRunnableTask.call_runner", "worker", "one model, all included"),
    ("model_compile", "dbt.compilation", "Compiler.compile_node", "worker", "Jinja -> SQL for one model"),
    ("model_materialize", "dbt.task.run", "ModelRunner.execute", "worker", "materialization macro incl. its SQL"),
    ("sql", "dbt.adapters.sql.connections", "SQLConnectionManager.add_query", "any", "SQL statements, round trip"),
    (
        "connection_open",
        "dbt.adapters.postgres.connections",
        "PostgresConnectionManager.open",
        "any",
        "psycopg2 connect",
    ),
)


def profile_in_process(
    url: str, work: Workdir, scratch: Path, start: date, days: int, dbt_windows: int
) -> dict[str, Any]:
    """In this process, with the CLI's own DbtSession: parse once, then time both engines' windows.

    The compiled engine runs every day of the range, as (3) does; the ``--engine dbt`` path
    ``dbt_windows`` day windows phase by phase (0: skipped).
    """
    from dbtbackfill.runner.session import DbtSession

    session = DbtSession(
        url,
        project_dir=work.cwd / "analytics",
        target_path=scratch / "target-profile",
        log_path=scratch / "logs-profile",
    )
    try:
        started = time.perf_counter()
        session.parse()
        parse_seconds = time.perf_counter() - started
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # `dbt ls` prints the names even when quiet
            models = session.select_models([])
        ls_seconds = time.perf_counter() - started
        compiled = profile_compiled(session, models, start, days)
        dbt = profile_dbt_windows(session, start, days, dbt_windows) if dbt_windows else None
    finally:
        session.close()
    return {
        "parse_seconds": r3(parse_seconds),
        "parse_note": "DbtSession.parse() in a fresh target dir: a full parse, as on a first CLI run",
        "select_models_seconds": r3(ls_seconds),
        "models": models,
        "compiled": compiled,
        "dbt_engine": dbt,
    }


def profile_compiled(session: Any, models: Sequence[str], start: date, days: int) -> dict[str, Any]:
    """The compiled engine as run_windows drives it: one compile and prepare, then every day's window."""
    from dbtbackfill.runner.compiled import NotCompilable

    timer = PhaseTimer()
    timer.patch("prepare", "dbtbackfill.runner.compiled", "CompiledWindows.open")
    try:
        started = time.perf_counter()
        compiled = session.compiled_windows(None, models)
        setup_seconds = time.perf_counter() - started
    except NotCompilable as exc:
        raise BenchmarkError(f"the models are not compilable in-process: {exc}") from exc
    finally:
        timer.restore()
    prepare_seconds = timer.seconds.get("prepare", 0.0)
    walls: list[float] = []
    cpus: list[float] = []
    rows = 0
    try:
        for offset in range(days):
            day = start + timedelta(days=offset)
            begun, begun_cpu = time.perf_counter(), time.process_time()
            done, error = compiled.run(day, day)
            walls.append(time.perf_counter() - begun)
            cpus.append(time.process_time() - begun_cpu)
            if error is not None:
                raise BenchmarkError(f"compiled window {day} failed: {error}")
            rows += sum(n for _, n in done)
    finally:
        compiled.close()
    log(
        f"profile: compiled engine, {setup_seconds:.2f}s set-up, then {days} windows, "
        f"{statistics.fmean(walls) * 1000:.1f} ms mean"
    )
    return {
        "models": list(compiled.models),
        "windows": days,
        # DbtSession.compiled_windows: one `dbt compile` of the selected models, then connecting and
        # preparing their statements (CompiledWindows.open, which also checks the tables' columns).
        "setup_seconds": r3(setup_seconds),
        "dbt_compile_seconds": r3(setup_seconds - prepare_seconds),
        "prepare_seconds": r3(prepare_seconds),
        "windows_seconds": r3(sum(walls)),
        "window_wall_ms_mean": round(statistics.fmean(walls) * 1000, 2),
        "window_wall_ms_median": round(statistics.median(walls) * 1000, 2),
        "window_wall_ms_p90": round(percentile(walls, 0.9) * 1000, 2),
        "window_wall_ms_max": round(max(walls) * 1000, 2),
        "window_cpu_ms_mean": round(statistics.fmean(cpus) * 1000, 2),
        "rows": rows,
    }


def profile_dbt_windows(session: Any, start: date, days: int, windows: int) -> dict[str, Any]:
    """Time the phases of ``windows`` day windows run like ``--engine dbt`` runs them (one invocation each).

    dbtRunner.invoke turns every exception, Ctrl-C included, into a failed result: so every
    result is checked, and a failure ends the benchmark (and its clean-up) instead of being skipped.
    """
    from dbtbackfill.core.planner import Window

    plan = [Window(0, start + timedelta(days=i % days), start + timedelta(days=i % days)) for i in range(windows + 2)]
    for window in plan[:2]:  # warm-up: first invocations fill Jinja and import caches
        if not session.run_window(window, None, []).success:
            raise BenchmarkError(f"warm-up window {window.label()} failed")

    timer = PhaseTimer()
    for phase, module, attribute, _, _ in PHASES:
        timer.patch(phase, module, attribute)
    walls: list[float] = []
    cpus: list[float] = []
    try:
        for window in plan[2:]:
            begun, begun_cpu = time.perf_counter(), time.process_time()
            result = session.run_window(window, None, [])
            walls.append(time.perf_counter() - begun)
            cpus.append(time.process_time() - begun_cpu)
            if not result.success:
                raise BenchmarkError(f"profiled window {window.label()} failed: {result.error}")
        phase_seconds = dict(timer.seconds)
        phase_calls = dict(timer.calls)
    finally:
        timer.restore()
    top = cprofile_one_window(session, plan[2])
    n = len(walls)
    phases = [
        {
            "phase": phase,
            "thread": thread,
            "what": what,
            "ms_per_window": round(phase_seconds.get(phase, 0.0) / n * 1000, 1),
            "calls_per_window": round(phase_calls.get(phase, 0) / n, 1),
        }
        for phase, _, _, thread, what in PHASES
    ]
    log(f"profile: --engine dbt, {n} windows in-process, {statistics.fmean(walls) * 1000:.0f} ms mean")
    mean_ms = statistics.fmean(walls) * 1000

    def ms(phase: str) -> float:
        return round(phase_seconds.get(phase, 0.0) / n * 1000, 1)

    return {
        "engine": "dbt: one in-process dbtRunner.invoke per window (DbtSession.run_window)",
        "windows": n,
        "window_wall_ms_mean": round(statistics.fmean(walls) * 1000, 1),
        "window_wall_ms_median": round(statistics.median(walls) * 1000, 1),
        "window_cpu_ms_mean": round(statistics.fmean(cpus) * 1000, 1),
        "summary": {
            # Everything but running the models: manifest copy, dbt's per-invocation set-up, before/after run.
            "outside_models_ms": round(mean_ms - ms("execute_nodes"), 1),
            "running_models_ms": ms("execute_nodes"),
            "sql_ms_all_threads": ms("sql"),
            "sql_statements": round(phase_calls.get("sql", 0) / n, 1),
            "connections_opened": round(phase_calls.get("connection_open", 0) / n, 1),
        },
        "phases": phases,
        "cprofile_top_tottime": top,
    }


def cprofile_one_window(session: Any, window: Any) -> list[dict[str, Any]]:
    """cProfile one window in every thread it uses; the functions that hold the CPU longest."""
    from dbt.task.runnable import GraphRunnableTask

    profiles: list[cProfile.Profile] = []
    original = GraphRunnableTask.call_runner

    def profiled_call_runner(self: Any, runner: Any) -> Any:
        worker = cProfile.Profile()
        worker.enable()
        try:
            return original(self, runner)
        finally:
            worker.disable()
            profiles.append(worker)

    GraphRunnableTask.call_runner = profiled_call_runner  # type: ignore[method-assign]
    main = cProfile.Profile()
    try:
        main.enable()
        result = session.run_window(window, None, [])
        main.disable()
    finally:
        GraphRunnableTask.call_runner = original  # type: ignore[method-assign]
    if not result.success:
        raise BenchmarkError(f"cProfiled window {window.label()} failed: {result.error}")
    stats = pstats.Stats(main)
    for worker in profiles:
        stats.add(worker)
    rows: list[dict[str, Any]] = []
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for (filename, line, name), (_, ncalls, tottime, cumtime, _) in raw.items():
        if name.startswith("<method 'acquire'") or (filename == "~" and "acquire" in name):
            continue  # the main thread waiting for the model threads, not work
        short = filename.split("site-packages/")[-1] if "site-packages/" in filename else Path(filename).name
        rows.append(
            {
                "function": f"{short}:{line}({name})" if filename != "~" else name,
                "calls": ncalls,
                "tottime_ms": round(tottime * 1000, 1),
                "cumtime_ms": round(cumtime * 1000, 1),
            }
        )
    rows.sort(key=lambda r: r["tottime_ms"], reverse=True)
    return rows[:20]


# ---------------------------------------------------------------- report


def git(*args: str) -> str:
    try:
        proc = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    except OSError:
        return ""
    return proc.stdout.rstrip("\n") if proc.returncode == 0 else ""


def environment_info(url: str) -> dict[str, Any]:
    with psycopg.connect(url) as conn:
        server = conn.execute("show server_version").fetchone()
    commit = git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "operator", "analytics", "scripts")
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": commit or None,
        # Uncommitted edits to the measured code (the dbtbackfill package is installed editable).
        "uncommitted_changes": [line[3:] for line in dirty.splitlines()],
        "python": platform.python_version(),
        "dbt_core": importlib.metadata.version("dbt-core"),
        "dbt_postgres": importlib.metadata.version("dbt-postgres"),
        "postgres": server[0] if server else None,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "load_average_1m_at_start": load_1m(),
    }


def verdicts(unchunked: dict[str, Any], naive: dict[str, Any], cli: dict[str, Any]) -> dict[str, Any]:
    cli_over_unchunked = cli["wall_seconds"] / unchunked["wall_seconds"]
    naive_over_cli = naive["wall_seconds"] / cli["wall_seconds"]
    return {
        "cli_over_unchunked": round(cli_over_unchunked, 2),
        "naive_over_cli": round(naive_over_cli, 2),
        "cli_over_unchunked_cpu": round(cli["cpu_seconds"] / unchunked["cpu_seconds"], 2),
        "naive_over_cli_cpu": round(naive["cpu_seconds"] / cli["cpu_seconds"], 2),
        "targets": {
            "cli_over_unchunked_at_most": MAX_CLI_OVER_UNCHUNKED,
            "cli_over_unchunked_met": cli_over_unchunked <= MAX_CLI_OVER_UNCHUNKED,
            "naive_over_cli_at_least": MIN_NAIVE_OVER_CLI,
            "naive_over_cli_met": naive_over_cli >= MIN_NAIVE_OVER_CLI,
        },
    }


def compare(other: dict[str, Any], unchunked: dict[str, Any], naive: dict[str, Any], cli: dict[str, Any]) -> None:
    """Ratios of a comparison run ((3d), (3w), (3m)) to (1), (2) and (3), on wall and CPU time."""
    other["over_unchunked"] = round(other["wall_seconds"] / unchunked["wall_seconds"], 2)
    other["naive_over_this"] = round(naive["wall_seconds"] / other["wall_seconds"], 2)
    other["over_cli"] = round(other["wall_seconds"] / cli["wall_seconds"], 2)
    other["over_cli_cpu"] = round(other["cpu_seconds"] / cli["cpu_seconds"], 2)


def _s(seconds: float) -> str:
    if seconds >= 10:
        return f"{seconds:,.1f} s"
    return f"{seconds:.2f} s" if seconds >= 0.1 else f"{seconds * 1000:.1f} ms"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 0.1 else f"{seconds * 1000:.0f} ms"


def _met(ok: bool) -> str:
    return "**met**" if ok else "**NOT met**"


def _engines(run: dict[str, Any]) -> str:
    lines = ", then ".join(f"`{e['line']}`" for e in run["engine_lines"])
    return f"{lines} ({run['windows_compiled']} of {run['windows']} window(s) compiled)"


def _row(label: str, run: dict[str, Any]) -> str:
    return (
        f"| {label} | 1 | {run['windows']} | {_s(run['wall_seconds'])} | {_s(run['per_window_wall_mean'])} | "
        f"{_s(run['cpu_seconds'])} | {run['rows']:,} |"
    )


def render_markdown(results: dict[str, Any]) -> str:
    cfg, env = results["config"], results["environment"]
    one, naive, cli, ratios = results["unchunked"], results["naive"], results["cli"], results["ratios"]
    cli_dbt: dict[str, Any] | None = results.get("cli_dbt_engine")
    targets = ratios["targets"]
    naive_how = (
        f"extrapolated from {naive['sample_size']} evenly spaced days"
        if naive["extrapolated"]
        else "every day measured"
    )
    lines = [
        f"Backfill of {cfg['start_date']}..{cfg['end_date']} ({cfg['days']} days), {cfg['tenants']} tenants, "
        f"{cfg['rows_per_day']} orders per tenant per day; all variants re-process existing tables (incremental "
        f"delete+insert). Measured {env['date']} on {env['cpus_usable']} CPU(s), Python {env['python']}, "
        f"dbt-core {env['dbt_core']}, dbt-postgres {env['dbt_postgres']}, PostgreSQL {env['postgres']}; "
        f"load average {env['load_average_1m_at_start']} at start, {env['load_average_1m_at_end']} at end "
        "(a shared machine: compare ratios, not absolute times).",
        "",
        "| Variant | Processes | Windows | Wall time | Per window | Client CPU | Rows |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| (1) one unchunked `dbt run` (median of {len(one['samples'])}) | 1 | 1 | "
        f"{_s(one['wall_seconds'])} | - | {_s(one['cpu_seconds'])} | {one['rows']:,} |",
        f"| (2) naive loop: one `dbt run` per day ({naive_how}) | {naive['processes']} | {naive['windows']} | "
        f"{_s(naive['wall_seconds'])} | {_s(naive['per_window_wall_mean'])} | {_s(naive['cpu_seconds'])} | "
        f"{naive['rows_extrapolated']:,}{' (extrapolated)' if naive['extrapolated'] else ''} |",
        _row("(3) `run_dbt_backfill --chunk day` (default `--engine auto`: compiled once, SQL per window)", cli),
        *(
            [_row("(3d) `run_dbt_backfill --chunk day --engine dbt` (one dbt invocation per window)", cli_dbt)]
            if cli_dbt
            else []
        ),
        *(
            _row(f"(3{o['chunk'][0]}) `run_dbt_backfill --chunk {o['chunk']}`, for comparison", o)
            for o in results["cli_other_chunks"]
        ),
        "",
        "| Ratio | Measured | Target | Verdict |",
        "|---|---:|---:|---|",
        f"| (3) / (1): chunked CLI vs. one unchunked run | {ratios['cli_over_unchunked']:.2f}x | "
        f"<= {targets['cli_over_unchunked_at_most']}x | {_met(targets['cli_over_unchunked_met'])} |",
        f"| (2) / (3): naive loop vs. chunked CLI | {ratios['naive_over_cli']:.1f}x | "
        f">= {targets['naive_over_cli_at_least']:.0f}x | {_met(targets['naive_over_cli_met'])} |",
        "",
        "Same ratios on client CPU time (less sensitive to other load): "
        f"(3)/(1) {ratios['cli_over_unchunked_cpu']:.2f}x, (2)/(3) {ratios['naive_over_cli_cpu']:.1f}x."
        + (
            f" With `--engine dbt` (3d), the previous design: {cli_dbt['over_unchunked']:.2f}x (1), "
            f"{cli_dbt['naive_over_this']:.1f}x faster than (2), {cli_dbt['over_cli']:.1f}x (3)'s wall time "
            f"and {cli_dbt['over_cli_cpu']:.1f}x its CPU time."
            if cli_dbt
            else ""
        )
        + "".join(
            f" With `--chunk {o['chunk']}` ({o['windows']} window(s), not what the targets are about): "
            f"{o['over_unchunked']:.2f}x (1), {o['naive_over_this']:.1f}x faster than (2)."
            for o in results["cli_other_chunks"]
        ),
        "",
        f"Engines, as the runs reported them: (3) {_engines(cli)}"
        + (f"; (3d) {_engines(cli_dbt)}" if cli_dbt else "")
        + "".join(f"; (3{o['chunk'][0]}) {_engines(o)}" for o in results["cli_other_chunks"])
        + ".",
        "",
        f"Where (3)'s {_s(cli['wall_seconds'])} go, timed by when its output lines arrive: "
        f"{_s(cli['before_plan_seconds'])} before its `plan:` line (interpreter and imports about "
        f"{_s(results['imports_seconds'])}, then the connection check, dbt parse and model selection); "
        f"{_s(cli['plan_to_first_window_seconds'])} from there to the first window (audit-table set-up, then the "
        "one `dbt compile` of the selected models and preparing their statements"
        + (
            f"; the same stretch of (3d), which compiles nothing, takes {_s(cli_dbt['plan_to_first_window_seconds'])}"
            if cli_dbt
            else ""
        )
        + f"); {_s(cli['windows_wall_seconds'])} in {cli['windows']} windows (mean "
        f"{_ms(cli['per_window_wall_mean'])}, median {_ms(cli['per_window_wall_median'])}, p90 "
        f"{_ms(cli['per_window_wall_p90'])}, max {_ms(cli['per_window_wall_max'])}: each window runs the prepared "
        "statements of every model in one transaction and prints one line)"
        + (
            f", plus {_s(cli['between_windows_seconds'])} between windows (the compile after a first window that dbt "
            "ran to create tables)"
            if cli["between_windows_seconds"] >= 0.01
            else ""
        )
        + f"; {_s(cli['last_window_to_summary_seconds'])} from the last window to the summary (the audit row) and "
        f"{_s(cli['summary_to_exit_seconds'])} from there to the process's exit.",
    ]
    in_process = results.get("in_process")
    if in_process:
        comp = in_process["compiled"]
        lines += [
            "",
            f"The compiled engine in-process (`DbtSession` as the CLI uses it): full parse "
            f"{_s(in_process['parse_seconds'])}, model selection {_s(in_process['select_models_seconds'])}, "
            f"then `compiled_windows` {_s(comp['setup_seconds'])} once ({_s(comp['dbt_compile_seconds'])} in "
            f"`dbt compile` of {len(comp['models'])} model(s), {_s(comp['prepare_seconds'])} connecting, checking "
            f"the tables' columns and preparing the statements); then {comp['windows']} day windows, "
            f"{_s(comp['windows_seconds'])} in all: mean {comp['window_wall_ms_mean']:.1f} ms wall (median "
            f"{comp['window_wall_ms_median']:.1f}, p90 {comp['window_wall_ms_p90']:.1f}, max "
            f"{comp['window_wall_ms_max']:.1f}), {comp['window_cpu_ms_mean']:.1f} ms client CPU: the rest is "
            "waiting for PostgreSQL.",
        ]
    profile = in_process.get("dbt_engine") if in_process else None
    if profile:
        summary = profile["summary"]
        lines += [
            "",
            "The `--engine dbt` path, i.e. (3d), in-process (one `dbtRunner.invoke` per window; "
            f"{profile['windows']} windows, mean {profile['window_wall_ms_mean']:.0f} ms wall, "
            f"{profile['window_cpu_ms_mean']:.0f} ms CPU): {summary['outside_models_ms']:.0f} ms "
            "outside the models (manifest copy, dbt's per-invocation set-up, before/after run) and "
            f"{summary['running_models_ms']:.0f} ms running them, in which {summary['sql_statements']:g} SQL "
            f"statements on {summary['connections_opened']:g} new connections take "
            f"{summary['sql_ms_all_threads']:.0f} ms (summed over threads). Phases nest: `invoke` contains the "
            "set-up rows and `execute_nodes`; model rows are summed over dbt's worker threads, which overlap. "
            "(3) pays one such invocation in all, for its compile, instead of one per window.",
            "",
            "| Phase (`--engine dbt`) | Thread | ms / window | calls / window | What |",
            "|---|---|---:|---:|---|",
        ]
        lines += [
            f"| `{p['phase']}` | {p['thread']} | {p['ms_per_window']:.1f} | {p['calls_per_window']:g} | {p['what']} |"
            for p in profile["phases"]
        ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


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
    parser = argparse.ArgumentParser(prog="python -m benchmarks.backfill_speed", description=__doc__.split("\n")[0])
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
    environment["load_average_1m_at_end"] = load_1m()

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

    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(results, indent=2) + "\n")
    markdown = render_markdown(results)
    opts.out.with_suffix(".md").write_text(markdown)
    print(markdown)
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
