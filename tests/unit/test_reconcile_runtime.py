"""Runtime defects a real control plane exposes, on the pure core (``decide`` and helpers).

- a chunk whose Pod never starts fails after ``startDeadlineSeconds``, with the Pod's reason;
- an attempt never starts while a Pod of an earlier one is alive (terminating, FailureTarget);
- suspend/resume never overlaps the deleted attempt and charges nothing;
- a Job that vanished unseen (TTL) is resolved from its audit row, never re-run blind;
- after a failed create, nothing launches before the API backoff.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from dbtbackfill.core.spec import BackfillSpec, parse_spec
from dbtbackfill.operator.jobs import Owner, job_name
from dbtbackfill.operator.reconcile import (
    ChunkState,
    Decision,
    JobView,
    api_backoff,
    decide,
    vanished,
    view_from_audit,
)

T0 = datetime(2024, 6, 1, 10, 0, 0, tzinfo=UTC)
OWNER = Owner(name="runtime", namespace="analytics", uid="0b5c1d7e-8f9a-4b2c-9d3e-1f2a3b4c5d6e")


def spec_of(n: int = 1, **overrides: Any) -> BackfillSpec:
    end = date(2024, 1, 1) + timedelta(days=n - 1)
    body = {
        "startDate": "2024-01-01",
        "endDate": end.isoformat(),
        "databaseSecretRef": {"name": "db"},
        "retry": {"limit": 1, "backoffSeconds": 10},
        **overrides,
    }
    return parse_spec(body)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def job(chunk: int, attempt: int, phase: str = "active", **fields: Any) -> JobView:
    return JobView(
        name=job_name(OWNER, chunk, attempt),
        chunk=chunk,
        attempt=attempt,
        phase=phase,  # type: ignore[arg-type]
        created=fields.pop("created", T0),
        **fields,
    )


def run(spec: BackfillSpec, state: ChunkState, jobs: list[JobView], now: datetime, **kw: Any) -> Decision:
    return decide(spec, spec.windows(), state, jobs, now, **kw)


def launched(decision: Decision) -> list[tuple[int, int]]:
    return [(item.window.index, item.attempt) for item in decision.launch]


LAUNCHED_ONCE = ChunkState(attempts={0: 1})


# ----------------------------------------------------------------------------- never started


def test_a_pod_that_never_starts_fails_the_attempt_after_the_deadline_with_its_reason() -> None:
    spec = spec_of(startDeadlineSeconds=60)
    reason = 'CreateContainerConfigError: secret "db" not found'
    waiting = job(0, 1, pod_started=False, start_problem=reason, alive=True)

    early = run(spec, LAUNCHED_ONCE, [waiting], at(59))
    assert (early.launch, early.delete, early.state.recent_failures) == ((), (), ())
    assert early.wake_after == pytest.approx(1)  # wakes when the deadline passes
    assert early.running == frozenset({0})

    due = run(spec, LAUNCHED_ONCE, [waiting], at(60))
    assert due.delete == (waiting.name,)
    (failure,) = due.state.recent_failures
    assert reason in failure.message and "startDeadlineSeconds=60" in failure.message
    assert [e.reason for e in due.events] == ["ChunkRetry"]
    assert reason in due.events[0].message
    assert due.launch == ()  # retried after the backoff, within retry.limit
    assert due.state.retry_at[0] == at(70)
    assert due.unstarted == ((0, 1, failure.message),)  # the operator writes its audit row
    assert run(spec, due.state, [replace(waiting, deleting=True)], at(61)).unstarted == ()  # once


def test_a_never_started_chunk_fails_the_backfill_once_its_retries_are_spent() -> None:
    spec = spec_of(startDeadlineSeconds=30, retry={"limit": 0})
    decision = run(spec, LAUNCHED_ONCE, [job(0, 1, pod_started=False, start_problem="ErrImageNeverPull: x")], at(31))
    assert decision.state.failed == frozenset({0})
    assert decision.phase == "Failed"
    assert [e.reason for e in decision.events] == ["ChunkFailed"]
    assert "ErrImageNeverPull" in decision.events[0].message


def test_a_started_pod_is_never_failed_by_the_start_deadline() -> None:
    spec = spec_of(startDeadlineSeconds=30)
    decision = run(spec, LAUNCHED_ONCE, [job(0, 1, pod_started=True, alive=True)], at(3600))
    assert (decision.delete, decision.state.recent_failures, decision.phase) == ((), (), "Running")


def test_a_never_started_job_without_a_known_reason_still_fails() -> None:
    decision = run(spec_of(startDeadlineSeconds=10), LAUNCHED_ONCE, [job(0, 1, pod_started=False)], at(10))
    assert "no container was created" in decision.state.recent_failures[0].message


def test_the_start_deadline_defaults_to_ten_minutes() -> None:
    assert spec_of().start_deadline_seconds == 600
    stuck = [job(0, 1, pod_started=False)]
    assert run(spec_of(), LAUNCHED_ONCE, stuck, at(599)).delete == ()
    assert run(spec_of(), LAUNCHED_ONCE, stuck, at(600)).delete == (stuck[0].name,)


def test_the_stuck_job_being_deleted_holds_its_chunk_until_it_is_gone() -> None:
    spec = spec_of(startDeadlineSeconds=10, retry={"limit": 2, "backoffSeconds": 1})
    stuck = job(0, 1, pod_started=False, start_problem="Unschedulable: 0/1 nodes", alive=True)
    first = run(spec, LAUNCHED_ONCE, [stuck], at(10))
    assert first.delete == (stuck.name,)
    # Still listed, being deleted, its Pod not gone: the due retry waits for it.
    deleting = replace(stuck, deleting=True)
    second = run(spec, first.state, [deleting], at(12))
    assert second.launch == () and second.delete == ()
    assert second.wake_after is not None
    assert len(second.state.recent_failures) == 1  # reported once
    gone = run(spec, second.state, [], at(13))
    assert launched(gone) == [(0, 2)]


# ----------------------------------------------------------------------------- no overlap


def test_a_retry_waits_while_the_failed_attempts_pod_is_still_terminating() -> None:
    spec = spec_of(retry={"limit": 2, "backoffSeconds": 1})
    # FailureTarget: the Job controller counts the Pod failed while it still runs (terminating).
    failing = job(0, 1, phase="failed", message="boom", alive=True)
    first = run(spec, LAUNCHED_ONCE, [failing], at(5))
    assert first.launch == ()
    assert [e.reason for e in first.events] == ["ChunkRetry"]
    assert first.wake_after is not None  # polls until the Pod is gone
    assert run(spec, first.state, [failing], at(7)).launch == ()  # due, but the Pod still runs
    settled = replace(failing, alive=False)
    assert launched(run(spec, first.state, [settled], at(7))) == [(0, 2)]


def test_a_pod_whose_job_is_already_gone_still_holds_its_chunk() -> None:
    # `kubectl delete job` (background) removes the Job first; its Pod may run on for a while.
    spec = spec_of(retry={"limit": 2, "backoffSeconds": 1})
    state = ChunkState(attempts={0: 1}, retry_at={0: at(0)})
    assert run(spec, state, [], at(5), busy=frozenset({0})).launch == ()
    assert launched(run(spec, state, [], at(5))) == [(0, 2)]


def test_suspend_then_resume_never_overlaps_the_deleted_attempt_and_charges_nothing() -> None:
    spec = spec_of(retry={"limit": 0})
    running = job(0, 1, pod_started=True, alive=True)
    suspended = run(replace(spec, suspend=True), LAUNCHED_ONCE, [running], at(5))
    assert suspended.delete == (running.name,)
    assert suspended.phase == "Suspended"
    # The Job controller marks the deleted Job failed while its Pod terminates; resumed meanwhile.
    terminating = replace(running, phase="failed", message="deleted", deleting=True, alive=True)
    resumed = run(spec, suspended.state, [terminating], at(6))
    assert resumed.launch == ()
    assert resumed.state.failed == frozenset() and resumed.state.recent_failures == ()
    after = run(spec, resumed.state, [], at(7))
    assert launched(after) == [(0, 2)]
    assert after.state.tries(0) == 1  # retry.limit 0: this uncharged attempt is its only try


# ----------------------------------------------------------------------------- vanished Jobs


def test_vanished_lists_recorded_attempts_whose_job_is_gone() -> None:
    state = ChunkState(attempts={0: 1, 1: 2, 2: 1, 3: 1}, succeeded=frozenset({4}), retry_at={3: at(0)})
    jobs = [job(1, 2), job(2, 3)]
    assert vanished(state, jobs) == [(0, 1)]  # 1 and 2 are listed; 3 is waiting for a retry


def test_a_vanished_attempt_that_succeeded_is_never_run_again() -> None:
    spec = spec_of(ttlSecondsAfterFinished=0)
    view = view_from_audit(0, 1, "completed", 42, None, job_name(OWNER, 0, 1))
    decision = run(spec, LAUNCHED_ONCE, [view], at(5))
    assert decision.launch == ()
    assert decision.phase == "Succeeded"
    assert decision.state.records == 42


def test_a_vanished_attempt_that_failed_is_charged_to_the_retry_budget() -> None:
    spec = spec_of(retry={"limit": 0})
    view = view_from_audit(0, 1, "failed", None, "division by zero", job_name(OWNER, 0, 1))
    decision = run(spec, LAUNCHED_ONCE, [view], at(5))
    assert decision.phase == "Failed"
    assert decision.launch == ()
    assert "division by zero" in decision.state.recent_failures[0].message


@pytest.mark.parametrize("status", ["running", None])
def test_a_vanished_attempt_without_a_closed_row_counts_as_a_failure(status: str | None) -> None:
    view = view_from_audit(0, 1, status, None, None, "x")
    assert view.phase == "failed"
    assert "deleted before the operator saw it finish" in (view.message or "")
    decision = run(spec_of(retry={"limit": 0}), LAUNCHED_ONCE, [view], at(5))
    assert decision.phase == "Failed"


def test_without_audit_information_a_vanished_job_is_relaunched_uncharged() -> None:
    # No audit database: the old behaviour, documented (keep the TTL longer than any outage).
    decision = run(spec_of(retry={"limit": 0}), LAUNCHED_ONCE, [], at(5))
    assert launched(decision) == [(0, 2)]


# ----------------------------------------------------------------------------- API backoff


def test_nothing_launches_before_the_api_backoff_ends() -> None:
    spec = spec_of(3, parallelism=3)
    held = run(spec, ChunkState(), [], at(0), launch_after=at(10))
    assert held.launch == ()
    assert held.wake_after == pytest.approx(10)
    assert held.phase == "Pending"
    assert launched(run(spec, ChunkState(), [], at(10), launch_after=at(10))) == [(0, 1), (1, 1), (2, 1)]


def test_api_backoff_doubles_from_five_seconds_to_five_minutes() -> None:
    assert [api_backoff(n) for n in (1, 2, 3, 4, 7, 50)] == [5.0, 10.0, 20.0, 40.0, 300.0, 300.0]
