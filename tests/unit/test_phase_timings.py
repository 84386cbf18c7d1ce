"""`dbtbackfill.runner.phase_timings`: the JSON line ``DBT_BACKFILL_TIMINGS=1`` prints (the CLI's use of it is
tested end to end in tests/integration/test_runner_cli.py)."""

from __future__ import annotations

import io
import itertools
import json
import os
import time
from pathlib import Path

from dbtbackfill.runner.phase_timings import KEY, PhaseTimings, process_start_unix


def test_without_the_variable_nothing_is_recorded_or_printed() -> None:
    timings = PhaseTimings.from_env({"DBT_BACKFILL_TIMINGS": "0"})
    timings.mark("main")
    out = io.StringIO()
    timings.report(out)
    assert (timings.enabled, timings.marks, out.getvalue()) == (False, [], "")


def test_the_line_gives_each_phase_from_the_mark_before_and_every_mark_in_order() -> None:
    timings = PhaseTimings.from_env({"DBT_BACKFILL_TIMINGS": "1"})
    for name in ("main", "parsed", "engine", "engine", "windows"):
        timings.mark(name)
    out = io.StringIO()
    timings.report(out)
    [line] = out.getvalue().splitlines()
    got = json.loads(line)[KEY]
    names = ["process_start", "main", "parsed", "engine", "engine_2", "windows"]
    assert list(got["marks_unix"]) == names
    stamps = list(got["marks_unix"].values())
    assert stamps == sorted(stamps) and stamps[0] <= stamps[1] <= time.time()
    assert list(got["phases_seconds"]) == names[1:]
    for (before, at), seconds in zip(itertools.pairwise(stamps), got["phases_seconds"].values(), strict=True):
        assert abs(seconds - (at - before)) < 1e-3
    assert list(got["phases_cpu_seconds"]) == names[1:]
    # The first phase is all the CPU the process used before `main`; the rest only what they burnt.
    assert all(cpu >= 0 for cpu in got["phases_cpu_seconds"].values())
    assert abs(got["phases_cpu_seconds"]["main"] - timings.marks[1][2]) < 1e-3


def test_cpu_time_is_counted_in_the_phase_that_burns_it() -> None:
    timings = PhaseTimings(enabled=True)
    timings.mark("idle")
    time.sleep(0.2)
    timings.mark("slept")
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:
        pass
    timings.mark("busy")
    got = json.loads(timings.line())[KEY]
    assert got["phases_cpu_seconds"]["busy"] >= 0.2 > got["phases_cpu_seconds"]["slept"]
    assert got["phases_seconds"]["slept"] >= 0.2


def test_the_process_start_is_read_from_proc_even_with_spaces_in_the_command_name(tmp_path: Path) -> None:
    own = process_start_unix()
    assert own is not None and own <= time.time()  # this test process started before now
    ticks = os.sysconf("SC_CLK_TCK")
    boot_ticks = int(time.clock_gettime(time.CLOCK_BOOTTIME) * ticks) - 5 * ticks  # 5 s ago
    fields = ["S", *["0"] * 18, str(boot_ticks), "0"]
    stat = tmp_path / "stat"
    stat.write_text(f"4242 (my ) odd name) {' '.join(fields)}\n")
    started = process_start_unix(stat)
    assert started is not None and abs(time.time() - started - 5) < 2
    assert process_start_unix(tmp_path / "missing") is None
    stat.write_text("4242 (short) S 1\n")
    assert process_start_unix(stat) is None
