"""Where a run's time goes: with ``DBT_BACKFILL_TIMINGS=1`` the runner prints one JSON line on stderr.

The runner marks the end of each of its phases (`PhaseTimings.mark`); when the run ends the line
``{"dbt_backfill_timings": {"phases_seconds": {...}, "phases_cpu_seconds": {...}, "marks_unix": {...}}}``
gives each phase's wall seconds and the process's CPU seconds in it (user + system, all threads: what
other load on the machine does not inflate; a phase is named by the mark that ends it and starts at
the mark before) and the wall-clock time (Unix seconds) of every mark, so that a benchmark can line
them up with timestamps taken outside the process (a Pod's, the API server's audit log). The first
mark, ``process_start``, is when the process was started, from ``/proc/self/stat`` (clock ticks:
10 ms on Linux): the first phase is the interpreter's start-up and the imports before the runner's
first line.

Without the variable nothing is recorded and nothing is printed. It is for measuring
(``benchmarks/chunk_cost_k8s.py``), not an interface: phases may be added or renamed.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

ENV = "DBT_BACKFILL_TIMINGS"
KEY = "dbt_backfill_timings"


def process_start_unix(stat: Path = Path("/proc/self/stat")) -> float | None:
    """When this process started, in Unix seconds; None where /proc does not say (not Linux)."""
    try:
        # Field 22 (starttime, ticks since boot); the command name before it may hold spaces.
        ticks = int(stat.read_text().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return time.time() - age


class PhaseTimings:
    """The marks of one run, in order; a no-op unless ``enabled``."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.marks: list[tuple[str, float, float]] = []  # (name, Unix time, process CPU time)
        if enabled:
            start = process_start_unix()
            if start is not None:
                self.marks.append(("process_start", start, 0.0))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> PhaseTimings:
        return cls(environ.get(ENV) == "1")

    def mark(self, name: str) -> None:
        """Record that the phase ``name`` ended now; a name marked again becomes ``name_2``, ``name_3``..."""
        if self.enabled:
            count = sum(1 for n, _, _ in self.marks if n == name or n.startswith(f"{name}_"))
            self.marks.append((f"{name}_{count + 1}" if count else name, time.time(), time.process_time()))

    def line(self) -> str:
        pairs = list(itertools.pairwise(self.marks))
        timings = {
            "phases_seconds": {name: round(at - before, 4) for (_, before, _), (name, at, _) in pairs},
            "phases_cpu_seconds": {name: round(cpu - was, 4) for (_, _, was), (name, _, cpu) in pairs},
            "marks_unix": {name: round(at, 4) for name, at, _ in self.marks},
        }
        return json.dumps({KEY: timings})

    def report(self, stream: TextIO | None = None) -> None:
        if self.enabled:
            out = stream or sys.stderr
            print(self.line(), file=out, flush=True)
