"""Where the time goes, in the benchmark's own process, with the CLI's own ``DbtSession``.

The compiled engine: the one compile and prepare, then every day's window. The ``--engine dbt``
path: each window phase by phase (`PHASES`), and one more under cProfile. dbt is imported only
here, inside the functions, so the rest of the benchmark starts without it.
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import pstats
import statistics
import time
from collections.abc import Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from benchmarks.backfill_speed.commands import Workdir, r3
from benchmarks.backfill_speed.phase_timer import PHASES, PhaseTimer
from benchmarks.recording import BenchmarkError, log, nearest_rank


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
        "window_wall_ms_p90": round(nearest_rank(walls, 90) * 1000, 2),
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
