"""What every operator benchmark records besides its numbers: where, when and under what load.

The machine is shared (other work runs while a benchmark does), so each result carries the load
average it was taken under, sampled through the run, and compares ratios within one run.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def _git(*args: str) -> str:
    result = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    return result.stdout.strip()


def environment() -> dict[str, Any]:
    """The run's context: date, commit (and uncommitted changes to measured code), machine."""
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "uncommitted": _git("status", "--porcelain", "--", "operator", "localcluster", "benchmarks").splitlines(),
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


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of ``values``; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


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


def publish(name: str, data: dict[str, Any], markdown: Callable[[dict[str, Any]], str], out_dir: Path) -> None:
    """Stamp ``measured_at``, write both files (`write_results`) and print the Markdown."""
    data["measured_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    path = write_results(name, data, markdown(data), out_dir)
    print((out_dir / f"{name}.md").read_text())
    print(f"wrote {path}", file=sys.stderr)


class Stopwatch:
    def __init__(self) -> None:
        self.started = time.monotonic()

    def seconds(self) -> float:
        return round(time.monotonic() - self.started, 2)
