"""The commands ``backfill_speed`` times, and how: a project snapshot, a fresh process, its lines as they arrive.

Everything here is about one measured process (its argv, its environment, its wall and CPU time,
its stderr lines stamped on arrival); what is done with the numbers lives in the other modules.
"""

from __future__ import annotations

import json
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import IO, Final

from benchmarks.recording import REPO_ROOT, BenchmarkError

START_DATE: Final = date(2024, 1, 1)
#: What the commands need of the repository: the project, the dbt package it installs (``local:
#: ../dbt-package``), and the CLI's entry point.
SNAPSHOT: Final = ("analytics", "dbt-package", "scripts")

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
    """Copy ``analytics/``, the ``dbt-package/`` it installs and ``scripts/`` to ``dest``; returns what was copied.

    The commands run against a snapshot, not the live tree: other people's runs leave
    untracked models in ``analytics/models`` and write to ``analytics/target``.
    """
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--", *SNAPSHOT], cwd=REPO_ROOT, capture_output=True, check=True
        ).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        listed = ""
    files = [f for f in listed.split("\0") if f and (REPO_ROOT / f).is_file()]
    if files:
        for rel in files:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / rel, dest / rel)
        return f"git-tracked files of {', '.join(f'{name}/' for name in SNAPSHOT)} (working-tree content)"
    for name in SNAPSHOT:
        ignore = shutil.ignore_patterns("target", "logs", "dbt_packages", "__pycache__")
        shutil.copytree(REPO_ROOT / name, dest / name, ignore=ignore)
    return f"{', '.join(f'{name}/' for name in SNAPSHOT)} without target/, logs/, dbt_packages/"


def dbt_deps_argv() -> list[str]:
    """``dbt deps`` in the snapshot: a plain ``dbt run`` needs the packages the project declares."""
    return [*dbt_executable(), "deps", "--project-dir", "analytics", "--profiles-dir", "analytics"]


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


def r3(value: float) -> float:
    return round(value, 3)


def r5(value: float) -> float:
    """For per-window times of a few milliseconds."""
    return round(value, 5)
