"""The operator as a pure state machine: ``decide`` against a simulated cluster.

A small in-test "cluster" holds the Jobs (as :class:`JobView`) and an in-test "operator"
holds the persisted ``.status``. One reconcile pass reads the status back with
``state_from_status``, calls ``decide``, deletes and creates Jobs, and writes
``summarise(...)`` through a JSON round-trip and a merge patch, as the controller does. A
"crash" drops that status write while the Jobs it created or deleted stay done, which is
what an operator killed between its API calls leaves behind.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dbtbackfill.core.spec import BackfillSpec, parse_spec
from dbtbackfill.operator.jobs import Owner, job_name
from dbtbackfill.operator.reconcile import (
    MAX_MESSAGE_CHARS,
    MAX_RECENT_FAILURES,
    ChunkState,
    Decision,
    Failure,
    JobView,
    Peer,
    blocking_peer,
    decide,
    reset_failed,
    state_from_status,
    state_to_status,
    waiting_for_peers,
)
from dbtbackfill.operator.status import changed, summarise
from tests.support.merge_patch import merge_patch

T0 = datetime(2024, 6, 1, 10, 0, 0, tzinfo=UTC)
OWNER = Owner(name="january-2024", namespace="analytics", uid="3f2b8c4e-1d2a-4b7e-9c1f-5a6b7c8d9e0f")
BASE_SPEC: dict[str, Any] = {
    "startDate": "2024-01-01",
    "endDate": "2024-01-31",
    "databaseSecretRef": {"name": "db"},
    "parallelism": 3,
    "retry": {"limit": 1, "backoffSeconds": 10},
}


def make_spec(**overrides: Any) -> BackfillSpec:
    return parse_spec({**BASE_SPEC, **overrides})


def days(n: int, **overrides: Any) -> BackfillSpec:
    """A backfill of ``n`` daily chunks from 2024-01-01."""
    end = date(2024, 1, 1) + timedelta(days=n - 1)
    return make_spec(endDate=end.isoformat(), **overrides)


# ----------------------------------------------------------------------------- simulation


@dataclass
class Cluster:
    """The Jobs of one backfill. Deletion is two-phase: marked deleting, then gone."""

    jobs: dict[str, JobView] = field(default_factory=dict)
    created: list[tuple[int, int]] = field(default_factory=list)  # every (chunk, attempt) ever created
    conflicts: int = 0

    def views(self) -> list[JobView]:
        return list(self.jobs.values())

    def create(self, chunk: int, attempt: int, now: datetime) -> None:
        name = job_name(OWNER, chunk, attempt)
        if name in self.jobs:  # 409 AlreadyExists: the controller keeps the existing Job
            self.conflicts += 1
            return
        self.created.append((chunk, attempt))
        self.jobs[name] = JobView(name=name, chunk=chunk, attempt=attempt, phase="active", started=now)

    def delete(self, name: str) -> None:
        if name in self.jobs:
            self.jobs[name] = replace(self.jobs[name], deleting=True)

    def collect(self) -> None:
        """Deleted Jobs finish terminating and vanish."""
        self.jobs = {n: j for n, j in self.jobs.items() if not j.deleting}

    def remove(self, chunk: int, attempt: int) -> None:
        """Someone (a person, the TTL controller) deleted the Job outright."""
        del self.jobs[job_name(OWNER, chunk, attempt)]

    def finish(
        self,
        chunk: int,
        attempt: int,
        phase: str,
        now: datetime,
        *,
        message: str | None = None,
        records: int | None = None,
        refused: bool = False,
    ) -> None:
        name = job_name(OWNER, chunk, attempt)
        job = self.jobs[name]
        assert job.phase == "active"
        self.jobs[name] = replace(
            job,
            phase=phase,  # type: ignore[arg-type]
            finished=now,
            message=message if phase == "failed" else None,
            records=records,
            refused=refused,
        )

    def active(self) -> list[JobView]:
        return sorted((j for j in self.jobs.values() if j.phase == "active"), key=lambda j: (j.chunk, j.attempt))

    def running(self) -> list[JobView]:
        """Active Jobs that are not being deleted: what actually holds a slot."""
        return [j for j in self.active() if not j.deleting]

    def succeeded_jobs(self) -> Counter[int]:
        return Counter(j.chunk for j in self.jobs.values() if j.phase == "succeeded")


def apply_merge_patch(status: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Top-level merge: null deletes the key, anything else replaces it whole: the status a
    pass meant to write. merge_patch is what the API server makes of the controller's patch."""
    out = dict(status)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


@dataclass
class Operator:
    """The controller's loop around ``decide``, with its persisted status."""

    spec: BackfillSpec
    cluster: Cluster = field(default_factory=Cluster)
    status: dict[str, Any] = field(default_factory=dict)
    decisions: list[Decision] = field(default_factory=list)
    max_running: int = 0
    api_server_merge: bool = False  # apply status patches as the API server does (RFC 7386)

    @property
    def windows(self) -> list[Any]:
        return self.spec.windows()

    def state(self) -> ChunkState:
        return state_from_status(self.status)

    def reconcile(
        self,
        now: datetime,
        *,
        crash: bool = False,
        blocked_by: str | None = None,
        state: ChunkState | None = None,
    ) -> Decision:
        windows = self.windows
        before = self.state() if state is None else state
        decision = decide(self.spec, windows, before, self.cluster.views(), now, blocked_by=blocked_by)
        for name in decision.delete:
            self.cluster.delete(name)
        for launch in decision.launch:
            assert (launch.window.index, launch.attempt) not in self.cluster.created, (
                f"relaunched chunk {launch.window.index} attempt {launch.attempt}"
            )
            self.cluster.create(launch.window.index, launch.attempt, now)
        self.check_cluster()
        if not crash:
            new = summarise(
                windows=windows,
                state=decision.state,
                phase=decision.phase,
                running=decision.running | {launch.window.index for launch in decision.launch},
                parallelism=self.spec.parallelism,
                generation=1,
                previous=self.status,
                now=now,
                blocked_by=decision.blocked_by,
            )
            if self.api_server_merge:  # what the controller does: changed() as a JSON merge patch
                self.status = merge_patch(self.status, json.loads(json.dumps(changed(self.status, new))))
            else:  # the status the pass meant to write, whole (independent of changed())
                self.status = apply_merge_patch(self.status, json.loads(json.dumps(new)))
                assert self.state() == _normalised(decision.state), "state did not survive the status round-trip"
        self.decisions.append(decision)
        return decision

    def check_cluster(self) -> None:
        running = self.cluster.running()
        self.max_running = max(self.max_running, len(running))
        assert len(running) <= self.spec.parallelism, running
        per_chunk = Counter(j.chunk for j in running)
        assert all(n == 1 for n in per_chunk.values()), per_chunk

    def run_until_done(self, now: datetime, *, step: timedelta = timedelta(seconds=30), limit: int = 500) -> datetime:
        """Every running Job succeeds; keep reconciling until the backfill is terminal."""
        for _ in range(limit):
            decision = self.reconcile(now)
            if decision.phase in ("Succeeded", "Failed"):
                return now
            now += step
            for job in self.cluster.active():
                self.cluster.finish(job.chunk, job.attempt, "succeeded", now, records=10)
            self.cluster.collect()
        raise AssertionError("the backfill never finished")


def _normalised(state: ChunkState) -> ChunkState:
    """What a state looks like after a trip through the status: times to the second, and
    zero retry bases dropped."""
    return replace(
        state,
        attempts=dict(state.attempts),
        retry_base={k: v for k, v in state.retry_base.items() if v},
        retry_at={k: v.replace(microsecond=0) for k, v in state.retry_at.items()},
        duration_total=round(state.duration_total, 3),
        recent_failures=tuple(replace(f, time=f.time.replace(microsecond=0)) for f in state.recent_failures),
    )


def launched(decision: Decision) -> list[tuple[int, int]]:
    return [(launch.window.index, launch.attempt) for launch in decision.launch]


def reasons(decision: Decision) -> list[str]:
    return [event.reason for event in decision.events]


def later(seconds: float, start: datetime = T0) -> datetime:
    return start + timedelta(seconds=seconds)


# ----------------------------------------------------------------------------- happy path


def test_runs_every_chunk_exactly_once_within_parallelism() -> None:
    op = Operator(make_spec())
    first = op.reconcile(T0)
    assert first.phase == "Running"
    assert launched(first) == [(0, 1), (1, 1), (2, 1)]
    assert reasons(first) == ["Started"]
    assert op.status["startTime"] == "2024-06-01T10:00:00Z"
    end = op.run_until_done(later(1))
    assert op.decisions[-1].phase == "Succeeded"
    assert op.max_running == 3
    assert op.cluster.created == [(c, 1) for c in range(31)]  # in chunk order, one attempt each
    assert op.cluster.succeeded_jobs() == Counter(range(31))
    state = op.state()
    assert state.succeeded == frozenset(range(31))
    assert state.records == 310
    assert state.duration_count == 31
    assert op.status["progress"] == "31/31"
    assert op.status["succeededRanges"] == ["2024-01-01..2024-01-31"]
    assert op.status["completionTime"] == end.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert sum(r == "Started" for d in op.decisions for r in reasons(d)) == 1
    # Finished is finished: later passes change nothing and ask for no wake-up.
    again = op.reconcile(later(3600, end))
    assert (again.phase, again.launch, again.delete, again.wake_after) == ("Succeeded", (), (), None)


def test_a_finished_job_frees_its_slot_in_the_same_pass() -> None:
    op = Operator(days(5, parallelism=2))
    op.reconcile(T0)
    op.cluster.finish(0, 1, "succeeded", later(5))
    decision = op.reconcile(later(6))
    assert launched(decision) == [(2, 1)]
    assert decision.running == frozenset({1})


def test_records_and_durations_are_counted_once_per_chunk() -> None:
    op = Operator(days(2, parallelism=2))
    op.reconcile(T0)
    op.cluster.finish(0, 1, "succeeded", later(40), records=7)
    for t in (41, 42, 43):  # the finished Job stays listed over several passes
        op.reconcile(later(t))
    state = op.state()
    assert (state.records, state.duration_count, state.duration_total) == (7, 1, 40.0)


# ----------------------------------------------------------------------------- retries


def test_failed_chunk_is_retried_after_backoff_and_not_before() -> None:
    op = Operator(days(1, retry={"limit": 2, "backoffSeconds": 10}))
    op.reconcile(T0)
    op.cluster.finish(0, 1, "failed", later(5), message="relation does not exist")
    failed = op.reconcile(later(6))
    assert failed.launch == ()
    assert failed.phase == "Running"
    assert failed.wake_after == pytest.approx(10)
    assert reasons(failed) == ["ChunkRetry"]
    assert "relation does not exist" in failed.events[0].message
    assert [f.message for f in op.state().recent_failures] == ["relation does not exist"]
    assert op.status["recentFailures"][0]["chunk"] == 0

    early = op.reconcile(later(15))
    assert early.launch == ()
    assert early.wake_after == pytest.approx(1)
    assert reasons(early) == []  # the failure is reported once

    due = op.reconcile(later(16))
    assert launched(due) == [(0, 2)]
    assert due.wake_after is None

    # The second failure waits twice as long: backoffSeconds * 2^(n-1).
    op.cluster.finish(0, 2, "failed", later(20), message="again")
    second = op.reconcile(later(20))
    assert second.wake_after == pytest.approx(20)
    assert op.reconcile(later(39)).launch == ()
    assert launched(op.reconcile(later(40))) == [(0, 3)]


def test_backoff_is_capped_by_max_backoff() -> None:
    op = Operator(days(1, retry={"limit": 5, "backoffSeconds": 100, "maxBackoffSeconds": 150}))
    now = T0
    op.reconcile(now)
    waits = []
    for attempt in range(1, 5):
        now += timedelta(seconds=1)
        op.cluster.finish(0, attempt, "failed", now, message="x")
        decision = op.reconcile(now)
        assert decision.wake_after is not None
        waits.append(decision.wake_after)
        now += timedelta(seconds=decision.wake_after)
        assert launched(op.reconcile(now)) == [(0, attempt + 1)]
    assert waits == [100, 150, 150, 150]


def test_other_chunks_keep_running_while_one_waits_for_its_retry() -> None:
    op = Operator(days(4, parallelism=2, retry={"limit": 1, "backoffSeconds": 60}))
    op.reconcile(T0)
    op.cluster.finish(0, 1, "failed", later(5), message="boom")
    decision = op.reconcile(later(5))
    assert launched(decision) == [(2, 1)]  # the slot goes to the next chunk
    assert decision.wake_after == pytest.approx(60)


def test_retries_exhausted_fails_fast_while_running_chunks_finish() -> None:
    op = Operator(days(5, parallelism=2, retry={"limit": 1, "backoffSeconds": 10}))
    op.reconcile(T0)  # chunks 0 and 1
    op.cluster.finish(0, 1, "failed", later(1), message="first")
    assert launched(op.reconcile(later(1))) == [(2, 1)]
    assert launched(op.reconcile(later(11))) == []  # no slot for the retry yet
    op.cluster.finish(1, 1, "succeeded", later(12))
    assert launched(op.reconcile(later(12))) == [(0, 2)]
    op.cluster.finish(0, 2, "failed", later(13), message="second")

    last = op.reconcile(later(14))
    assert reasons(last) == ["ChunkFailed"]
    assert "failed after 2 attempt(s)" in last.events[0].message
    assert last.state.failed == frozenset({0})
    assert last.phase == "Running"  # chunk 2 is still running: it may finish
    assert last.launch == ()
    assert op.status["failedRanges"] == ["2024-01-01..2024-01-01"]

    op.cluster.finish(2, 1, "succeeded", later(20))
    done = op.reconcile(later(21))
    assert done.phase == "Failed"
    assert done.launch == ()
    assert done.state.succeeded == frozenset({1, 2})
    for t in (100, 1000, 10000):  # and nothing starts later either
        assert op.reconcile(later(t)).launch == ()
    assert op.cluster.created == [(0, 1), (1, 1), (2, 1), (0, 2)]
    assert op.status["phase"] == "Failed"
    conditions = {c["type"]: c for c in op.status["conditions"]}
    assert conditions["Succeeded"]["status"] == "False"
    assert "second" in conditions["Succeeded"]["message"]


def test_retry_limit_zero_fails_on_the_first_failure() -> None:
    op = Operator(days(2, parallelism=1, retry={"limit": 0}))
    op.reconcile(T0)
    op.cluster.finish(0, 1, "failed", later(1), message="no")
    decision = op.reconcile(later(2))
    assert decision.phase == "Failed"
    assert decision.state.failed == frozenset({0})
    assert decision.launch == ()


def test_a_refused_chunk_fails_at_once_whatever_its_retry_limit() -> None:
    """Exit 3 (the contract check refused it): every retry would be refused alike."""
    op = Operator(days(2, parallelism=2, retry={"limit": 3, "backoffSeconds": 1}))
    op.reconcile(T0)
    op.cluster.finish(0, 1, "failed", later(1), message="model m: never reads the window", refused=True)
    op.cluster.finish(1, 1, "failed", later(1), message="could not connect to server")
    decision = op.reconcile(later(2))
    assert decision.state.failed == frozenset({0})  # the refusal: failed, no retry scheduled
    assert set(decision.state.retry_at) == {1}  # an ordinary failure still retries
    assert [(e.reason, "was refused, not retried" in e.message) for e in decision.events] == [
        ("ChunkFailed", True),
        ("ChunkRetry", False),
    ]
    assert "never reads the window" in decision.events[0].message
    assert op.state().recent_failures[0].message == "model m: never reads the window"
    later_pass = op.reconcile(later(10))
    assert (0, 2) not in op.cluster.created
    assert 0 in later_pass.state.failed and 0 not in later_pass.state.retry_at


def test_recent_failures_are_bounded_and_messages_truncated() -> None:
    op = Operator(days(1, retry={"limit": 20, "backoffSeconds": 1, "maxBackoffSeconds": 1}))
    now = T0
    op.reconcile(now)
    for attempt in range(1, 16):
        now += timedelta(seconds=5)
        op.cluster.finish(0, attempt, "failed", now, message=f"attempt {attempt} " + "x" * 5000)
        op.reconcile(now)
        now += timedelta(seconds=5)
        op.reconcile(now)
    failures = op.state().recent_failures
    assert len(failures) == MAX_RECENT_FAILURES
    assert [f.attempts for f in failures] == list(range(6, 16))  # the newest, oldest first
    assert all(len(f.message) <= MAX_MESSAGE_CHARS for f in failures)


# ----------------------------------------------------------------------------- retryFailed


def failed_backfill(*, limit: int = 0, keep_failed_job: bool) -> tuple[Operator, datetime]:
    """Three chunks; chunk 1 exhausts its retries, 0 and 2 succeed: phase Failed."""
    op = Operator(days(3, parallelism=3, retry={"limit": limit, "backoffSeconds": 10}))
    op.reconcile(T0)
    now = later(5)
    op.cluster.finish(0, 1, "succeeded", now)
    op.cluster.finish(2, 1, "succeeded", now)
    for attempt in range(1, limit + 2):
        op.cluster.finish(1, attempt, "failed", now, message=f"failure {attempt}")
        op.reconcile(now)
        now += timedelta(seconds=3600)
        op.reconcile(now)
    assert op.decisions[-1].phase == "Failed"
    assert op.state().failed == frozenset({1})
    if not keep_failed_job:  # e.g. ttlSecondsAfterFinished removed them
        for attempt in range(1, limit + 2):
            op.cluster.remove(1, attempt)
    return op, now


def test_reset_failed_gives_failed_chunks_a_fresh_budget_and_nothing_else() -> None:
    state = ChunkState(
        succeeded=frozenset({0, 2}),
        failed=frozenset({1, 4}),
        attempts={1: 3, 3: 1, 4: 1},
        retry_base={1: 0},
        retry_at={3: T0},
        recent_failures=(Failure(1, "w", 3, "m", T0),),
    )
    reset = reset_failed(state)
    assert reset.failed == frozenset()
    assert reset.succeeded == state.succeeded
    assert reset.attempts == state.attempts
    assert reset.retry_at == state.retry_at
    assert reset.tries(1) == 0
    assert reset.tries(4) == 0
    assert reset.tries(3) == state.tries(3)
    assert reset.recent_failures == ()
    assert reset_failed(reset) == reset  # idempotent


def test_retry_failed_reruns_only_the_failed_chunks_while_their_jobs_remain() -> None:
    """The common case: the failed attempt's Job is still listed (ttlSecondsAfterFinished unset)."""
    op, now = failed_backfill(keep_failed_job=True)
    decision = op.reconcile(now, state=reset_failed(op.state()))
    assert launched(decision) == [(1, 2)]
    assert decision.phase == "Running"
    assert "ChunkRetry" not in reasons(decision)  # the old failure is not reported again
    op.cluster.finish(1, 2, "succeeded", later(10, now))
    assert op.reconcile(later(11, now)).phase == "Succeeded"
    assert op.cluster.succeeded_jobs() == Counter({0: 1, 1: 1, 2: 1})


def test_retry_failed_gives_a_fresh_retry_budget_after_the_failed_job_is_gone() -> None:
    op, now = failed_backfill(limit=1, keep_failed_job=False)
    decision = op.reconcile(now, state=reset_failed(op.state()))
    assert launched(decision) == [(1, 3)]
    # The re-run gets retry.limit retries again: one failure is retried after the first backoff...
    op.cluster.finish(1, 3, "failed", later(1, now), message="still broken")
    retry = op.reconcile(later(1, now))
    assert reasons(retry) == ["ChunkRetry"]
    assert retry.wake_after == pytest.approx(10)
    assert launched(op.reconcile(later(11, now))) == [(1, 4)]
    # ...and the next one fails the backfill again.
    op.cluster.finish(1, 4, "failed", later(12, now), message="still broken")
    assert op.reconcile(later(12, now)).phase == "Failed"


# ----------------------------------------------------------------------------- suspend


def test_suspend_deletes_running_jobs_and_resume_relaunches_them_without_charging_retries() -> None:
    op = Operator(days(4, parallelism=2, retry={"limit": 1, "backoffSeconds": 10}))
    op.reconcile(T0)
    op.cluster.finish(0, 1, "succeeded", later(5))
    op.reconcile(later(5))  # chunks 1 and 2 run

    op.spec = replace(op.spec, suspend=True)
    suspended = op.reconcile(later(10))
    assert suspended.phase == "Suspended"
    assert suspended.launch == ()
    assert set(suspended.delete) == {job_name(OWNER, 1, 1), job_name(OWNER, 2, 1)}
    assert suspended.wake_after is None
    assert op.status["phase"] == "Suspended"

    # While the Jobs terminate they are not deleted twice, and nothing starts.
    terminating = op.reconcile(later(11))
    assert (terminating.launch, terminating.delete) == ((), ())
    op.cluster.collect()
    gone = op.reconcile(later(12))
    assert (gone.phase, gone.launch, gone.delete) == ("Suspended", (), ())
    assert op.reconcile(later(13)).launch == ()

    op.spec = replace(op.spec, suspend=False)
    resumed = op.reconcile(later(20))
    assert resumed.phase == "Running"
    assert launched(resumed) == [(1, 2), (2, 2)]
    state = op.state()
    assert state.tries(1) == state.tries(2) == 1  # the deleted attempts are not charged
    # So one real failure is still retried (retry.limit 1), not fatal.
    op.cluster.finish(1, 2, "failed", later(25), message="real failure")
    assert reasons(op.reconcile(later(25))) == ["ChunkRetry"]


def test_resume_waits_for_a_terminating_job_before_relaunching() -> None:
    op = Operator(days(2, parallelism=1))
    op.reconcile(T0)
    op.spec = replace(op.spec, suspend=True)
    op.reconcile(later(1))
    op.spec = replace(op.spec, suspend=False)
    still_terminating = op.reconcile(later(2))
    assert still_terminating.launch == ()
    op.cluster.collect()
    assert launched(op.reconcile(later(3))) == [(0, 2)]


def test_suspended_before_start_launches_nothing() -> None:
    op = Operator(days(3, suspend=True))
    decision = op.reconcile(T0)
    assert (decision.phase, decision.launch, decision.delete) == ("Suspended", (), ())
    assert "startTime" not in op.status


# ----------------------------------------------------------------------------- crash recovery


def test_job_created_but_not_recorded_is_adopted() -> None:
    op = Operator(days(4, parallelism=2))
    first = op.reconcile(T0, crash=True)  # Jobs created, status never written
    assert launched(first) == [(0, 1), (1, 1)]
    assert op.status == {}
    after = op.reconcile(later(30))
    assert after.launch == ()
    assert after.running == frozenset({0, 1})
    assert dict(op.state().attempts) == {0: 1, 1: 1}
    assert op.cluster.conflicts == 0


def test_adopted_job_that_already_finished_counts() -> None:
    op = Operator(days(2, parallelism=1))
    op.reconcile(T0, crash=True)
    op.cluster.finish(0, 1, "succeeded", later(10), records=3)
    decision = op.reconcile(later(11))
    assert decision.state.succeeded == frozenset({0})
    assert launched(decision) == [(1, 1)]
    assert decision.state.records == 3


def test_lost_job_is_relaunched_with_the_next_attempt() -> None:
    op = Operator(days(2, parallelism=1, retry={"limit": 0}))
    op.reconcile(T0)
    op.cluster.remove(0, 1)  # deleted by hand, or TTL-deleted before it was seen
    decision = op.reconcile(later(60))
    assert launched(decision) == [(0, 2)]
    assert op.state().tries(0) == 1  # the lost attempt is not charged: limit 0 still allows this one
    op.cluster.finish(0, 2, "succeeded", later(70))
    assert launched(op.reconcile(later(71))) == [(1, 1)]


def test_stale_active_job_of_an_older_attempt_is_deleted() -> None:
    spec = days(2, parallelism=2)
    old = JobView(job_name(OWNER, 0, 1), 0, 1, "active", started=T0)
    new = JobView(job_name(OWNER, 0, 2), 0, 2, "active", started=T0)
    decision = decide(spec, spec.windows(), ChunkState(attempts={0: 2}), [old, new], later(1))
    assert decision.delete == (old.name,)
    assert decision.running == frozenset({0})
    assert launched(decision) == [(1, 1)]
    assert dict(decision.state.attempts) == {0: 2, 1: 1}


def test_active_job_of_a_succeeded_chunk_is_deleted() -> None:
    spec = days(2, parallelism=1)
    stray = JobView(job_name(OWNER, 0, 2), 0, 2, "active", started=T0)
    done = JobView(job_name(OWNER, 0, 1), 0, 1, "succeeded", started=T0, finished=T0)
    decision = decide(spec, spec.windows(), ChunkState(), [done, stray], later(1))
    assert decision.state.succeeded == frozenset({0})
    assert stray.name in decision.delete
    assert 0 not in decision.running


def test_jobs_of_chunks_outside_the_plan_are_ignored() -> None:
    spec = days(2)
    alien = JobView("x", 7, 1, "succeeded")
    decision = decide(spec, spec.windows(), ChunkState(), [alien], T0)
    assert 7 not in decision.state.succeeded
    assert 7 not in decision.state.attempts


def test_replayed_decision_after_a_crash_decides_the_same() -> None:
    op = Operator(days(6, parallelism=2))
    op.reconcile(T0)
    op.cluster.finish(0, 1, "succeeded", later(5))
    persisted = op.state()
    one = decide(op.spec, op.windows, persisted, op.cluster.views(), later(6))
    two = decide(op.spec, op.windows, persisted, op.cluster.views(), later(6))
    assert one == two


def test_blocked_backfill_is_queued_and_launches_nothing() -> None:
    op = Operator(days(3))
    decision = op.reconcile(T0, blocked_by="backfill-2023")
    assert decision.phase == "Queued"
    assert decision.launch == ()
    assert decision.blocked_by == "backfill-2023"
    assert op.status["queuedBehind"] == "backfill-2023"
    assert "startTime" not in op.status
    unblocked = op.reconcile(later(60))
    assert unblocked.phase == "Running"
    assert len(unblocked.launch) == 3
    assert "queuedBehind" not in op.status  # the merge patch removed it


def test_a_finished_peer_wakes_only_backfills_that_have_not_started() -> None:
    queued = Operator(days(3)).reconcile(T0, blocked_by="backfill-2023").phase
    running = Operator(days(3)).reconcile(T0).phase
    phases = {"q": queued, "r": running, "p": "Pending", "s": "Suspended", "ok": "Succeeded", "f": "Failed"}
    # "new" has had no pass yet: it may still find itself blocked, so it is woken too.
    assert waiting_for_peers(phases, ["r", "q", "new", "s", "p", "ok", "f"]) == ["q", "new", "p"]


# ----------------------------------------------------------------------------- found bugs


def test_succeeded_chunks_leave_no_bookkeeping_behind() -> None:
    """chunkState's maps must stay bounded by parallelism (state_to_status says so), however
    long finished Jobs stay listed (ttlSecondsAfterFinished unset keeps them forever)."""
    op = Operator(days(40, parallelism=4))
    op.run_until_done(T0)
    state = op.state()
    assert state.succeeded == frozenset(range(40))
    assert dict(state.attempts) == {}
    # The Jobs are cleaned up later (TTL, or by hand): succeeded chunks are not "lost".
    for job in list(op.cluster.views()):
        op.cluster.remove(job.chunk, job.attempt)
    op.reconcile(later(86400))
    state = op.state()
    assert (dict(state.attempts), dict(state.retry_base), dict(state.retry_at)) == ({}, {}, {})


def test_a_retry_adopted_after_a_crash_still_backs_off_and_respects_the_limit() -> None:
    op = Operator(days(1, retry={"limit": 1, "backoffSeconds": 10}))
    op.reconcile(T0)
    op.cluster.finish(0, 1, "failed", later(1), message="first")
    assert op.reconcile(later(1)).wake_after == pytest.approx(10)
    assert launched(op.reconcile(later(11), crash=True)) == [(0, 2)]  # retry created, status lost
    adopted = op.reconcile(later(12))
    assert adopted.running == frozenset({0})
    op.cluster.finish(0, 2, "failed", later(13), message="second")
    decision = op.reconcile(later(13))
    # retry.limit is 1: attempt 2 was the last one.
    assert launched(decision) == []
    assert decision.phase == "Failed"
    assert reasons(decision) == ["ChunkFailed"]
    assert [f.message for f in op.state().recent_failures] == ["first", "second"]


def test_an_outage_does_not_sweep_the_whole_plan() -> None:
    """A database outage: every chunk fails within seconds and waits an hour for its retry.

    A chunk waiting for its backoff frees its slot for the next chunk (see
    test_other_chunks_keep_running_while_one_waits_for_its_retry), but chunks in flight
    (running or waiting) must stay bounded by a small multiple of parallelism. Otherwise the
    operator sweeps the whole range, one doomed Job per chunk, and chunkState (attempts and
    retryAt, one entry per chunk) grows with the plan instead of with parallelism: 3,652
    daily chunks make a 156 KB status (see test_status).
    """
    op = Operator(
        make_spec(
            startDate="2023-01-01",
            endDate="2023-12-31",
            parallelism=4,
            retry={"limit": 2, "backoffSeconds": 3600, "maxBackoffSeconds": 86400},
        )
    )
    now = T0
    for _ in range(60):
        op.reconcile(now)
        now += timedelta(seconds=10)
        for job in op.cluster.active():
            op.cluster.finish(job.chunk, job.attempt, "failed", now, message="could not connect to server")
    state = op.state()
    in_flight = set(state.attempts) - state.succeeded - state.failed
    assert len(in_flight) <= 2 * op.spec.parallelism, f"{len(in_flight)} chunks started during the outage"
    assert len(op.cluster.created) <= 2 * op.spec.parallelism


def test_suspending_a_retry_does_not_charge_it_while_the_failed_attempt_is_listed() -> None:
    """The lost-attempt check must look for the recorded attempt's Job, not any Job of the
    chunk: the failed attempt 1 is still listed when the suspended attempt 2 disappears."""
    op = Operator(days(1, retry={"limit": 2, "backoffSeconds": 10}))
    op.reconcile(T0)
    op.cluster.finish(0, 1, "failed", later(1), message="real failure")
    op.reconcile(later(1))
    assert launched(op.reconcile(later(11))) == [(0, 2)]
    op.spec = replace(op.spec, suspend=True)
    assert op.reconcile(later(12)).delete == (job_name(OWNER, 0, 2),)
    op.cluster.collect()
    op.reconcile(later(13))
    op.spec = replace(op.spec, suspend=False)
    assert launched(op.reconcile(later(14))) == [(0, 3)]
    assert op.state().tries(0) == 2  # attempt 1 failed, attempt 2 was suspended: one retry used
    op.cluster.finish(0, 3, "failed", later(15), message="second real failure")
    decision = op.reconcile(later(15))
    assert reasons(decision) == ["ChunkRetry"]  # retry.limit 2: one retry left
    assert decision.phase == "Running"


def test_a_job_deleted_before_its_creation_was_recorded_is_not_replaced_under_its_own_name() -> None:
    """Two status writes lost in a row, around a suspend: the Job's (chunk, attempt), and so
    its name and audit execution id, must not be reused for a new run."""
    op = Operator(days(1))
    op.reconcile(T0, crash=True)  # creates chunk 0 attempt 1; status lost
    op.spec = replace(op.spec, suspend=True)
    op.reconcile(later(1), crash=True)  # deletes it; status lost again
    op.cluster.collect()
    op.spec = replace(op.spec, suspend=False)
    decision = decide(op.spec, op.windows, op.state(), op.cluster.views(), later(2))
    assert (0, 1) not in launched(decision)


def test_a_chunk_that_keeps_failing_fails_the_backfill_through_real_merge_patches() -> None:
    """The status patch is an RFC 7386 merge patch: retryAt {} in it does not remove the
    stored retryAt entry, so the stale entry hides every later failure of the chunk from
    decide, which relaunches it at once, forever: no backoff, no event, never Failed."""
    op = Operator(days(1, retry={"limit": 1, "backoffSeconds": 10}), api_server_merge=True)
    now = T0
    op.reconcile(now)
    outcomes = []
    for _ in range(6):
        for job in op.cluster.active():
            op.cluster.finish(job.chunk, job.attempt, "failed", now, message="boom")
        now += timedelta(seconds=11)
        decision = op.reconcile(now)
        outcomes.append((decision.phase, launched(decision), reasons(decision)))
        if decision.phase == "Failed":
            break
    assert outcomes == [
        ("Running", [], ["ChunkRetry"]),
        ("Running", [(0, 2)], []),
        ("Failed", [], ["ChunkFailed"]),
    ]
    assert op.cluster.created == [(0, 1), (0, 2)]


# ----------------------------------------------------------------------------- property


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[BackfillSpec, int]:
    chunks = draw(st.integers(1, 6))
    spec = days(
        chunks,
        parallelism=draw(st.integers(1, 3)),
        retry={"limit": draw(st.integers(0, 2)), "backoffSeconds": draw(st.sampled_from([1, 5, 30]))},
    )
    return spec, draw(st.integers(1, 25))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.data())
def test_random_outcomes_and_crashes_never_duplicate_and_always_finish(
    scenario: tuple[BackfillSpec, int], data: st.DataObject
) -> None:
    """Jobs succeed or fail (within the retry budget) in any order, time jumps by any amount,
    and any status write may be lost: no (chunk, attempt) is ever created twice (Operator
    asserts it), no chunk ever has two running Jobs, parallelism is never exceeded
    (check_cluster), and once Jobs stop failing every chunk succeeds exactly once."""
    spec, steps = scenario
    op = Operator(spec)
    failures: Counter[int] = Counter()
    now = T0
    for _ in range(steps):
        for job in op.cluster.active():
            outcome = data.draw(st.sampled_from(["run", "succeed", "fail"]))
            if outcome == "fail" and failures[job.chunk] >= spec.retry_limit:
                outcome = "succeed"
            if outcome != "run":
                phase = "succeeded" if outcome == "succeed" else "failed"
                op.cluster.finish(job.chunk, job.attempt, phase, now, message="boom", records=1)
                failures[job.chunk] += outcome == "fail"
        now += timedelta(seconds=data.draw(st.sampled_from([0, 1, 4, 10, 31, 120])))
        decision = op.reconcile(now, crash=data.draw(st.booleans()))
        assert decision.phase in ("Running", "Succeeded")

    end = op.run_until_done(now, step=timedelta(seconds=60))
    assert op.decisions[-1].phase == "Succeeded"
    assert op.cluster.succeeded_jobs() == Counter(range(len(op.windows)))
    assert op.state().succeeded == frozenset(range(len(op.windows)))
    assert op.status["progress"] == f"{len(op.windows)}/{len(op.windows)}"
    # Attempts per chunk: one, plus one per failure; adopted Jobs are never launched twice.
    per_chunk = Counter(chunk for chunk, _ in op.cluster.created)
    for chunk, count in per_chunk.items():
        assert count == 1 + failures[chunk]
    assert op.reconcile(later(3600, end)).launch == ()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.data())
def test_random_suspends_and_crashes_never_run_a_chunk_twice(
    scenario: tuple[BackfillSpec, int], data: st.DataObject
) -> None:
    """Suspend and resume at any moment, Jobs terminating slowly, status writes lost: still
    no (chunk, attempt) created twice (Operator asserts it), at most one running Job per
    chunk and never above parallelism (check_cluster), nothing launched while suspended.

    Suspending costs no retries, so without lost writes a backfill whose chunks fail at most
    retry.limit times always succeeds. (Two lost writes in a row around a resume may charge
    the suspended attempt, as the fact that it was lost was never persisted: then the
    backfill may end Failed, but it still ends.)
    """
    spec, steps = scenario
    op = Operator(spec)
    failures: Counter[int] = Counter()
    crashes = 0
    now = T0
    for _ in range(steps):
        if data.draw(st.booleans()):
            op.spec = replace(op.spec, suspend=data.draw(st.booleans()))
        if data.draw(st.booleans()):
            op.cluster.collect()
        for job in op.cluster.active():
            if job.deleting:
                continue
            outcome = data.draw(st.sampled_from(["run", "succeed", "fail"]))
            if outcome == "fail" and failures[job.chunk] >= spec.retry_limit:
                outcome = "succeed"
            if outcome != "run":
                phase = "succeeded" if outcome == "succeed" else "failed"
                op.cluster.finish(job.chunk, job.attempt, phase, now, message="boom")
                failures[job.chunk] += outcome == "fail"
        now += timedelta(seconds=data.draw(st.sampled_from([0, 1, 10, 120])))
        crash = data.draw(st.booleans())
        crashes += crash
        decision = op.reconcile(now, crash=crash)
        if op.spec.suspend:
            assert decision.launch == ()
            assert decision.phase == "Suspended"
        elif not crashes:
            assert decision.phase in ("Running", "Succeeded")
    op.spec = replace(op.spec, suspend=False)
    op.cluster.collect()
    op.run_until_done(now, step=timedelta(seconds=60))
    if not crashes:
        assert op.decisions[-1].phase == "Succeeded"
        assert op.cluster.succeeded_jobs() == Counter(range(len(op.windows)))
    assert all(n == 1 for n in op.cluster.succeeded_jobs().values())


# ----------------------------------------------------------------------------- status round-trip


@settings(max_examples=80, deadline=None)
@given(
    succeeded=st.frozensets(st.integers(0, 400), max_size=60),
    failed=st.frozensets(st.integers(401, 500), max_size=5),
    attempts=st.dictionaries(st.integers(0, 500), st.integers(1, 30), max_size=8),
    base=st.dictionaries(st.integers(0, 500), st.integers(0, 30), max_size=4),
    retry_at=st.dictionaries(st.integers(0, 500), st.integers(0, 10**6), max_size=4),
    records=st.integers(0, 2**40),
    durations=st.tuples(st.integers(0, 10**4), st.floats(0, 10**7, allow_nan=False)),
)
def test_chunk_state_round_trips_through_the_status(
    succeeded: frozenset[int],
    failed: frozenset[int],
    attempts: dict[int, int],
    base: dict[int, int],
    retry_at: dict[int, int],
    records: int,
    durations: tuple[int, float],
) -> None:
    state = ChunkState(
        succeeded=succeeded,
        failed=failed,
        attempts=attempts,
        retry_base=base,
        retry_at={c: later(s) for c, s in retry_at.items()},
        records=records,
        duration_count=durations[0],
        duration_total=round(durations[1], 3),
    )
    raw = json.loads(json.dumps({"chunkState": state_to_status(state)}))
    assert state_from_status(raw) == _normalised(state)


@pytest.mark.parametrize("status", [None, {}, {"chunkState": None}, {"chunkState": {}, "recentFailures": None}])
def test_state_from_an_empty_status_is_the_initial_state(status: dict[str, Any] | None) -> None:
    assert state_from_status(status) == ChunkState()


# ----------------------------------------------------------------------------- overlap guard


def peer(
    name: str,
    created: str,
    *,
    phase: str | None = None,
    started: bool = False,
    **spec: Any,
) -> Peer:
    return Peer(name=name, created=created, spec=make_spec(**spec), phase=phase, started=started)


OLD = "2024-06-01T09:00:00Z"
NEW = "2024-06-01T10:00:00Z"


def wait_for(name: str, created: str, spec: BackfillSpec, peers: Iterable[Peer]) -> str | None:
    return blocking_peer(name, created, spec, list(peers))


def test_of_two_pending_overlapping_backfills_the_older_goes_first() -> None:
    a = peer("a", OLD)
    b = peer("b", NEW)
    assert wait_for("a", OLD, a.spec, [a, b]) is None
    assert wait_for("b", NEW, b.spec, [a, b]) == "a"


def test_same_creation_time_is_broken_by_name() -> None:
    a = peer("a", NEW)
    b = peer("b", NEW)
    assert wait_for("a", NEW, a.spec, [b]) is None
    assert wait_for("b", NEW, b.spec, [a]) == "a"


def test_a_running_peer_blocks_even_if_newer() -> None:
    running = peer("newer", NEW, phase="Running", started=True)
    assert wait_for("older", OLD, make_spec(), [running]) == "newer"
    suspended = peer("newer", NEW, phase="Suspended", started=True, suspend=True)
    assert wait_for("older", OLD, make_spec(), [suspended]) == "newer"


@pytest.mark.parametrize("phase", ["Succeeded", "Failed", "Cancelled"])
def test_terminal_peers_do_not_block(phase: str) -> None:
    done = peer("done", OLD, phase=phase, started=True)
    assert wait_for("me", NEW, make_spec(), [done]) is None


def test_a_suspended_peer_that_never_started_does_not_block() -> None:
    parked = peer("parked", OLD, suspend=True)
    assert wait_for("me", NEW, make_spec(), [parked]) is None


def test_non_overlapping_peers_do_not_block() -> None:
    me = make_spec(tenantId="acme")
    others = [
        peer("other-tenant", OLD, phase="Running", started=True, tenantId="globex"),
        peer("other-dates", OLD, phase="Running", started=True, startDate="2023-01-01", endDate="2023-12-31"),
        peer("adjacent", OLD, phase="Running", started=True, startDate="2024-02-01", endDate="2024-02-29"),
    ]
    assert wait_for("me", NEW, me, others) is None


def test_an_unscoped_backfill_overlaps_every_tenant() -> None:
    tenant = peer("acme", OLD, phase="Running", started=True, tenantId="acme")
    assert wait_for("all", NEW, make_spec(), [tenant]) == "acme"
    everyone = peer("all", OLD, phase="Running", started=True)
    assert wait_for("acme", NEW, make_spec(tenantId="acme"), [everyone]) == "all"


def test_one_shared_day_is_an_overlap() -> None:
    edge = peer("edge", OLD, phase="Running", started=True, startDate="2024-01-31", endDate="2024-02-15")
    assert wait_for("me", NEW, make_spec(), [edge]) == "edge"


def test_a_backfill_never_waits_for_itself() -> None:
    me = peer("me", OLD, phase="Running", started=True)
    assert wait_for("me", OLD, me.spec, [me]) is None


def test_the_first_blocking_peer_is_the_oldest() -> None:
    peers = [
        peer("c", "2024-06-01T08:00:00Z", phase="Running", started=True),
        peer("b", "2024-06-01T07:00:00Z", phase="Running", started=True),
        peer("x", "2024-06-01T06:00:00Z", phase="Running", started=True, tenantId="zz", startDate="2020-01-01"),
    ]
    assert wait_for("me", NEW, make_spec(tenantId="acme"), peers) == "b"
