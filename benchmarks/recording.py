"""What every benchmark shares: its clock, its statistics, and what it records besides its numbers.

The machine is shared (other work runs while a benchmark does), so each result carries the load
average it was taken under, sampled through the run, and compares ratios within one run. The
statistics here (nearest-rank percentiles, rounded medians) are the only ones the benchmarks use,
so two results' "p95" always mean the same thing.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


class BenchmarkError(RuntimeError):
    """A measured run failed or did not do what it is meant to measure: its numbers would be meaningless."""


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def git(*args: str) -> str:
    """``git ARGS`` in the repository: its output without the final newline, "" if git fails.

    Only the trailing newline goes: ``git status --porcelain`` lines start with a space.
    """
    try:
        result = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    except OSError:
        return ""
    return result.stdout.rstrip("\n") if result.returncode == 0 else ""


def log(message: str) -> None:
    """One progress line on stderr, with the time of day (stdout is for the results)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def environment() -> dict[str, Any]:
    """The run's context: date, commit (and uncommitted changes to measured code), machine."""
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted": git("status", "--porcelain", "--", "operator", "localcluster", "benchmarks").splitlines(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average_start": load_average(),
    }


class Sampler:
    """Calls ``probe`` every ``interval`` seconds in a thread and keeps what it returns (None: skip)."""

    def __init__(self, probe: Callable[[], float | None], interval: float = 0.5) -> None:
        self.probe = probe
        self.interval = interval
        self.values: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            value = self.probe()
            if value is not None:
                self.values.append(value)
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def summary(self) -> dict[str, float | None]:
        values = self.values
        return {
            "samples": len(values),
            "min": min(values, default=None),
            "mean": round(sum(values) / len(values), 2) if values else None,
            "max": max(values, default=None),
        }


def nearest_rank(values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile (``q`` in 0..100): the smallest value with ``q`` % of them at or below it.

    ``q * n`` is multiplied before dividing by 100 so that an exact rank (p90 of 30 values: the
    27th) is not pushed to the next one by a binary fraction. ValueError when there are no values.
    """
    if not values:
        raise ValueError("no values to take a percentile of")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is not within 0..100")
    ordered = sorted(values)
    rank = min(len(ordered), max(1, math.ceil(q * len(ordered) / 100)))
    return ordered[rank - 1]


def percentile(values: Sequence[float], q: float) -> float | None:
    """`nearest_rank`, or None when there are no values (a part of a run that saw none)."""
    return nearest_rank(values, q) if values else None


def median(values: Iterable[float], digits: int = 3) -> float:
    """The median, rounded to ``digits``: what the results record."""
    return round(statistics.median(values), digits)


def distribution(values: Sequence[float], digits: int = 3) -> dict[str, Any]:
    def r(v: float | None) -> float | None:
        return None if v is None else round(v, digits)

    return {
        "count": len(values),
        "p50": r(percentile(values, 50)),
        "p95": r(percentile(values, 95)),
        "p99": r(percentile(values, 99)),
        "max": r(max(values, default=None)),
        "mean": r(sum(values) / len(values)) if values else None,
    }


def write_results(name: str, data: dict[str, Any], markdown: str, out_dir: Path = RESULTS_DIR) -> Path:
    """``<out_dir>/<name>.json`` (everything) and ``<name>.md`` (the tables to quote)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    (out_dir / f"{name}.md").write_text(markdown.rstrip() + "\n")
    return path


def publish(
    name: str, data: dict[str, Any], markdown: Callable[[dict[str, Any]], str], out_dir: Path = RESULTS_DIR
) -> None:
    """Stamp ``measured_at``, write both files (`write_results`) and print the Markdown.

    ``markdown`` gets the data as stored, so the stored JSON always renders to the stored Markdown.
    """
    data["measured_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    path = write_results(name, data, markdown(data), out_dir)
    print((out_dir / f"{name}.md").read_text())
    print(f"wrote {path}", file=sys.stderr)


class Stopwatch:
    """Seconds since it was made, on the monotonic high-resolution clock, rounded for the results."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def seconds(self, digits: int = 2) -> float:
        return round(time.perf_counter() - self.started, digits)
