"""Which finished Jobs a pass may label settled (and later passes then never list), on the pure core.

The invariant: once the status that ``reconcile.settled`` was computed from is written, leaving
those Jobs out of every later pass changes no decision (no relaunch, no lost Job, no double
count), and the pass that finds the same Jobs again (the operator died before labelling them)
settles them again.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest

from dbtbackfill.operator.jobs import DEFAULT_UNSETTLED_KEPT, SettleConfigError, parse_unsettled_kept
from dbtbackfill.operator.reconcile import ChunkState, JobView, decide, reset_failed, settled, to_label
from tests.unit.test_reconcile_runtime import LAUNCHED_ONCE, T0, at, job, spec_of

Trace = list[tuple[Any, ...]]


def test_a_succeeded_chunks_jobs_are_settled_whatever_their_pods_do() -> None:
    done = ChunkState(succeeded=frozenset({0}))
    jobs = [job(0, 1, "failed", alive=False), job(0, 2, "succeeded", alive=True)]
    assert settled(done, jobs, 1) == (jobs[0].name, jobs[1].name)


def test_active_and_deleting_jobs_are_never_settled() -> None:
    done = ChunkState(succeeded=frozenset({0}))
    assert settled(LAUNCHED_ONCE, [job(0, 1, "active", alive=True)], 1) == ()
    assert settled(done, [job(0, 1, "succeeded", deleting=True)], 1) == ()


def test_a_failed_attempt_is_settled_once_its_retry_is_recorded_and_no_pod_of_it_runs() -> None:
    spec = spec_of(1)
    failing = job(0, 1, "failed", alive=True, message="boom")  # FailureTarget: its Pod terminates
    first = decide(spec, spec.windows(), LAUNCHED_ONCE, [failing], at(5))
    assert 0 in first.state.retry_at
    assert settled(first.state, [failing], 1) == ()  # it still keeps the chunk busy
    gone = replace(failing, alive=False)
    assert settled(first.state, [gone], 1) == (gone.name,)


def test_a_failed_attempt_whose_end_is_not_recorded_is_not_settled() -> None:
    """The status still says attempt 1 runs: only a pass that absorbed its end may settle it."""
    assert settled(LAUNCHED_ONCE, [job(0, 1, "failed", alive=False)], 1) == ()


def test_an_exhausted_or_forgiven_failure_is_settled() -> None:
    spec = spec_of(1, retry={"limit": 0})
    failed = job(0, 1, "failed", alive=False, message="boom")
    decision = decide(spec, spec.windows(), LAUNCHED_ONCE, [failed], at(5))
    assert decision.state.failed == {0}
    assert settled(decision.state, [failed], 1) == (failed.name,)
    forgiven = reset_failed(decision.state)  # retryFailed: a fresh budget, the attempt uncharged
    assert settled(forgiven, [failed], 1) == (failed.name,)


def test_a_job_of_a_cell_outside_the_plan_is_left_alone() -> None:
    assert settled(ChunkState(succeeded=frozenset({5})), [job(5, 1, "succeeded")], 3) == ()


# ----------------------------------------------------------------------------- whole runs


OUTCOMES = {(0, 1): "succeeded", (1, 1): "failed", (1, 2): "succeeded", (2, 1): "failed", (2, 2): "failed"}


def simulate(*, settle: bool, skip_label_at: int | None = None) -> tuple[Trace, set[str], dict[str, JobView]]:
    """Passes over a 3-chunk backfill (parallelism 2, one retry) in a world where Jobs end
    one pass after they start and a failed Job's Pod terminates for one more pass. With
    ``settle``, each pass's settled Jobs are hidden from every later pass (except at
    ``skip_label_at``: the operator died after the status patch, before labelling).
    After chunk 2 fails for good, retryFailed forgives it and its third attempt succeeds."""
    spec = spec_of(3, parallelism=2, retry={"limit": 1, "backoffSeconds": 10})
    outcomes = {**OUTCOMES, (2, 3): "succeeded"}
    state = ChunkState()
    world: dict[str, JobView] = {}
    hidden: set[str] = set()
    trace: Trace = []
    now = T0
    forgiven = False
    for step in range(40):
        listed = [j for name, j in world.items() if name not in hidden]
        decision = decide(spec, spec.windows(), state, listed, now)
        trace.append(
            (
                step,
                tuple((item.window.index, item.attempt) for item in decision.launch),
                decision.phase,
                decision.delete,
                tuple(sorted(decision.state.succeeded)),
                tuple(sorted(decision.state.failed)),
                dict(decision.state.attempts),
            )
        )
        state = decision.state
        if settle and step != skip_label_at:
            hidden |= set(settled(state, listed, 3))
        if decision.phase == "Failed" and not forgiven:
            state = reset_failed(state)
            forgiven = True
        for name, seen in list(world.items()):
            if seen.phase == "active":
                world[name] = replace(seen, phase=outcomes[(seen.chunk, seen.attempt)], finished=now)  # type: ignore[arg-type]
            elif seen.alive:
                world[name] = replace(seen, alive=False)  # its Pod is gone now
        for item in decision.launch:
            launched = job(item.window.index, item.attempt, created=now, started=now, alive=True)
            world[launched.name] = launched
        if decision.phase == "Succeeded":
            break
        now += timedelta(seconds=6)
    return trace, hidden, world


def test_hiding_settled_jobs_changes_no_decision_of_a_whole_run() -> None:
    listed_all, _, _ = simulate(settle=False)
    trace, hidden, world = simulate(settle=True)
    assert trace == listed_all
    assert trace[-1][2] == "Succeeded" and trace[-1][4] == (0, 1, 2)
    launches = [launch for step in trace for launch in step[1]]
    assert sorted(launches) == [(0, 1), (1, 1), (1, 2), (2, 1), (2, 2), (2, 3)]  # nothing ran twice
    assert hidden == set(world)  # the last pass settles every Job left


def test_a_pass_that_died_before_labelling_settles_the_same_jobs_next_time() -> None:
    listed_all, _, _ = simulate(settle=False)
    _, every_time, _ = simulate(settle=True)
    for step in range(len(listed_all) - 1):  # the last pass has no next one
        trace, hidden, _ = simulate(settle=True, skip_label_at=step)
        assert trace == listed_all
        assert hidden == every_time


def test_only_settled_jobs_beyond_the_kept_number_are_labelled() -> None:
    names = [f"j{i}" for i in range(7)]
    assert to_label(names, 0) == tuple(names)
    assert to_label(names, 5) == ("j0", "j1")  # two beyond the five a pass may keep listing
    assert to_label(names, 7) == () and to_label(names, 50) == ()


def test_the_kept_number_is_a_whole_number_in_range() -> None:
    assert parse_unsettled_kept(None) == parse_unsettled_kept(" ") == DEFAULT_UNSETTLED_KEPT
    assert parse_unsettled_kept("0") == 0 and parse_unsettled_kept(" 200 ") == 200
    for bad in ("-1", "ten", "1.5", "10001"):
        with pytest.raises(SettleConfigError, match="DBT_BACKFILL_UNSETTLED_JOBS"):
            parse_unsettled_kept(bad)


def test_a_bad_kept_number_stops_the_operator_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    for env in ("DBT_BACKFILL_ALLOWED_IMAGES", "DBT_BACKFILL_ALLOWED_SERVICE_ACCOUNTS", "DBT_BACKFILL_WORKERS"):
        monkeypatch.delenv(env, raising=False)  # only this setting is wrong
    monkeypatch.setenv("DBT_BACKFILL_UNSETTLED_JOBS", "many")
    result = subprocess.run(
        [sys.executable, "-m", "dbtbackfill.cli", "operator"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "DBT_BACKFILL_UNSETTLED_JOBS" in result.stderr and "Traceback" not in result.stderr
