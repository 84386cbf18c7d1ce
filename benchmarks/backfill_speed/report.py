"""What ``backfill_speed`` reports: the run's environment, the targets' verdicts, and the Markdown.

``render_markdown`` is a function of the results JSON alone, so a stored
``benchmarks/results/backfill_speed.json`` renders again to its ``.md``.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from datetime import UTC, datetime
from typing import Any, Final

import psycopg

from benchmarks.backfill_speed.commands import SNAPSHOT
from benchmarks.recording import git, load_average

#: The project's targets: the chunked CLI within 1.5x of one unchunked run, and 10x faster than a per-day loop.
MAX_CLI_OVER_UNCHUNKED: Final = 1.5
MIN_NAIVE_OVER_CLI: Final = 10.0


def environment_info(url: str) -> dict[str, Any]:
    with psycopg.connect(url) as conn:
        server = conn.execute("show server_version").fetchone()
    commit = git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "operator", *SNAPSHOT)
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
        "load_average_1m_at_start": load_average(),
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
