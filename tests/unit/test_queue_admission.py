"""Queue admission (pure): the ceiling, priority, age, fair share, allowed windows, pause."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dbtbackfill.core.spec import parse_spec
from dbtbackfill.operator import queue_gate
from dbtbackfill.operator.controller import admitted_decision
from dbtbackfill.operator.queue_admission import (
    Member,
    QueueSpec,
    QueueSpecError,
    TimeWindow,
    admit,
    gate,
    missing_queue_verdict,
    parse_queue_spec,
    recorded_demand,
    seconds_until_open,
    verdict_for,
)
from dbtbackfill.operator.queue_gate import _member
from dbtbackfill.operator.queue_status import QueueRow, queue_events, queue_status, with_queue
from dbtbackfill.operator.reconcile import ChunkState, Decision, decide

NOON = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


def member(name: str, *, priority: int = 0, created: str = "2024-01-01T00:00:00Z", running: int = 0,
           wanting: int = 0) -> Member:  # fmt: skip
    return Member(f"uid-{name}", name, priority, created, running, wanting)


def at(clock: str) -> datetime:
    hours, minutes = clock.split(":")
    return NOON.replace(hour=int(hours), minute=int(minutes))


# --- spec -------------------------------------------------------------------------------------


def test_parse_a_full_spec() -> None:
    spec = parse_queue_spec(
        {"maxRunningChunks": 4, "paused": True, "allowedWindows": [{"start": "20:00", "end": "06:00"}]}
    )
    assert spec == QueueSpec(4, (TimeWindow(20 * 60, 6 * 60),), True)
    assert parse_queue_spec({"maxRunningChunks": 1}) == QueueSpec(1)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({}, "spec.maxRunningChunks"),
        ({"maxRunningChunks": 0}, "spec.maxRunningChunks"),
        ({"maxRunningChunks": True}, "spec.maxRunningChunks"),
        ({"maxRunningChunks": "2"}, "spec.maxRunningChunks"),
        ({"maxRunningChunks": 2, "paused": "yes"}, "spec.paused"),
        (
            {"maxRunningChunks": 2, "allowedWindows": [{"start": "24:00", "end": "06:00"}]},
            "spec.allowedWindows[0].start",
        ),
        ({"maxRunningChunks": 2, "allowedWindows": [{"start": "20:00", "end": "6:00"}]}, "spec.allowedWindows[0].end"),
        ({"maxRunningChunks": 2, "allowedWindows": [{"start": "20:00", "end": "20:00"}]}, "spec.allowedWindows[0]"),
        ({"maxRunningChunks": 2, "allowedWindows": [{"start": "20:00"}]}, "spec.allowedWindows[0]"),
        ({"maxRunningChunks": 2, "allowedWindows": "night"}, "spec.allowedWindows"),
        ({"maxRunningChunks": 2, "maxRunning": 3}, "spec.maxRunning"),
    ],
)
def test_invalid_specs_name_their_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(QueueSpecError) as caught:
        parse_queue_spec(spec)
    assert str(caught.value).startswith(f"{field}:")
    assert "\n" not in str(caught.value)


# --- gate and windows ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("clock", "expected"),
    [("20:00", "Open"), ("23:59", "Open"), ("00:00", "Open"), ("05:59", "Open"), ("06:00", "OutsideAllowedWindow"),
     ("12:00", "OutsideAllowedWindow"), ("19:59", "OutsideAllowedWindow")],
)  # fmt: skip
def test_a_window_wraps_midnight(clock: str, expected: str) -> None:
    night = parse_queue_spec({"maxRunningChunks": 2, "allowedWindows": [{"start": "20:00", "end": "06:00"}]})
    assert gate(night, at(clock)) == expected


def test_paused_wins_over_an_open_window() -> None:
    assert gate(QueueSpec(2, (), paused=True), NOON) == "QueuePaused"
    assert gate(QueueSpec(2), NOON) == "Open"


minutes = st.integers(min_value=0, max_value=24 * 60 - 1)


@given(start=minutes, end=minutes, minute=minutes)
def test_window_contains_exactly_the_minutes_from_start_up_to_end(start: int, end: int, minute: int) -> None:
    if start == end:
        return
    inside = set()
    m = start
    while m != end:  # walk the clock forward from start, wrapping at midnight
        inside.add(m)
        m = (m + 1) % (24 * 60)
    assert TimeWindow(start, end).contains(minute) == (minute in inside)


@given(
    windows=st.lists(st.tuples(minutes, minutes).filter(lambda w: w[0] != w[1]), min_size=1, max_size=4),
    minute=minutes,
    second=st.integers(0, 59),
)
def test_seconds_until_open_lands_on_the_first_open_minute(
    windows: list[tuple[int, int]], minute: int, second: int
) -> None:
    spec = QueueSpec(1, tuple(TimeWindow(a, b) for a, b in windows))
    now = NOON.replace(hour=minute // 60, minute=minute % 60, second=second)
    wait = seconds_until_open(spec, now)
    assert wait is not None
    if gate(spec, now) == "Open":
        assert wait == 0
        return
    assert wait > 0
    assert gate(spec, now + timedelta(seconds=wait)) == "Open"
    # No earlier minute of the wait was open.
    moment = now.replace(second=0) + timedelta(minutes=1)
    while moment < now + timedelta(seconds=wait):
        assert gate(spec, moment) == "OutsideAllowedWindow"
        moment += timedelta(minutes=1)


def test_no_windows_means_always_open() -> None:
    assert seconds_until_open(QueueSpec(1), NOON) is None


# --- admission -----------------------------------------------------------------------------------


def test_the_ceiling_counts_every_alive_job_of_the_queue() -> None:
    a = member("a", running=1, wanting=5)
    # 3 alive Jobs in the queue, one of them of a backfill gone from it: only one slot left.
    assert admit(QueueSpec(4), [a], running=3, now=NOON).grants == {"uid-a": 1}
    assert admit(QueueSpec(4), [a], running=4, now=NOON).grants == {"uid-a": 0}
    assert admit(QueueSpec(4), [a], running=9, now=NOON).grants == {"uid-a": 0}  # lowered below what runs


def test_higher_priority_first_even_when_younger() -> None:
    old = member("old", priority=0, created="2024-01-01T00:00:00Z", wanting=3)
    urgent = member("urgent", priority=10, created="2024-02-01T00:00:00Z", wanting=3)
    assert admit(QueueSpec(2), [old, urgent], running=0, now=NOON).grants == {"uid-old": 0, "uid-urgent": 2}
    assert admit(QueueSpec(5), [old, urgent], running=0, now=NOON).grants == {"uid-old": 2, "uid-urgent": 3}


def test_equal_priorities_share_fairly_and_the_older_gets_the_odd_slot() -> None:
    young = member("young", created="2024-02-01T00:00:00Z", wanting=4)
    old = member("old", created="2024-01-01T00:00:00Z", wanting=4)
    assert admit(QueueSpec(3), [young, old], running=0, now=NOON).grants == {"uid-young": 1, "uid-old": 2}
    # Fair share counts what already runs: the one with fewer Jobs catches up first.
    busy = member("old", created="2024-01-01T00:00:00Z", running=2, wanting=4)
    assert admit(QueueSpec(4), [young, busy], running=2, now=NOON).grants == {"uid-young": 2, "uid-old": 0}


def test_nothing_is_admitted_while_paused_or_outside_the_windows() -> None:
    a = member("a", wanting=3)
    assert admit(QueueSpec(4, paused=True), [a], running=0, now=NOON).grants == {"uid-a": 0}
    night = parse_queue_spec({"maxRunningChunks": 4, "allowedWindows": [{"start": "20:00", "end": "06:00"}]})
    assert admit(night, [a], running=0, now=NOON).grants == {"uid-a": 0}
    assert admit(night, [a], running=0, now=at("22:30")).grants == {"uid-a": 3}


@st.composite
def queues(draw: st.DrawFn) -> tuple[QueueSpec, list[Member], int]:
    count = draw(st.integers(1, 6))
    members = [
        Member(
            uid=f"u{i}",
            name=f"b{i}",
            priority=draw(st.integers(-2, 2)),
            created=f"2024-01-0{draw(st.integers(1, 9))}T00:00:00Z",
            running=draw(st.integers(0, 4)),
            wanting=draw(st.integers(0, 6)),
        )
        for i in range(count)
    ]
    outsiders = draw(st.integers(0, 3))  # alive Jobs of backfills no longer in the queue
    spec = QueueSpec(draw(st.integers(1, 12)), paused=draw(st.booleans()))
    return spec, members, sum(m.running for m in members) + outsiders


@given(queues())
def test_admission_properties(queue: tuple[QueueSpec, list[Member], int]) -> None:
    spec, members, running = queue
    grants = admit(spec, members, running, NOON).grants
    total = sum(grants.values())
    free = 0 if spec.paused else max(0, spec.max_running_chunks - running)
    # Never above the ceiling, never more than asked, and no slot left idle while someone waits.
    assert running + total <= max(running, spec.max_running_chunks)
    assert all(0 <= grants[m.uid] <= m.wanting for m in members)
    assert total == min(free, sum(m.wanting for m in members))
    for low in members:
        for high in members:
            if grants[low.uid] and high.priority > low.priority:
                assert grants[high.uid] == high.wanting, "a lower priority got a slot a higher one wanted"
            if low.priority == high.priority and grants[low.uid] and grants[high.uid] < high.wanting:
                # Fair share: the one left wanting never ends with fewer running than the other
                # had before its last slot (and on a tie, the older one got that slot).
                mine = low.running + grants[low.uid]
                theirs = high.running + grants[high.uid]
                assert theirs >= mine - 1
                if theirs == mine - 1:
                    assert (low.created, low.name) <= (high.created, high.name)


# --- verdicts and status ----------------------------------------------------------------------------


def test_verdict_reasons() -> None:
    a = member("a", running=1, wanting=2)
    b = member("b", priority=5, wanting=2)
    full = verdict_for("wh", QueueSpec(2), [a, b], a, running=1, now=NOON)
    assert (full.granted, full.waiting, full.reason, full.demand) == (0, 2, "WaitingForQueue", 3)
    assert full.wake == ("uid-b",)  # b was granted the free slot: its daemon must act on it
    assert full.wake_after is not None
    admitted = verdict_for("wh", QueueSpec(8), [a, b], a, running=1, now=NOON)
    assert (admitted.granted, admitted.waiting, admitted.reason) == (2, 0, "Admitted")
    idle = verdict_for("wh", QueueSpec(8), [member("a", running=1)], member("a", running=1), running=1, now=NOON)
    assert idle.reason == "NotWaiting"
    paused = verdict_for("wh", QueueSpec(8, paused=True), [a], a, running=1, now=NOON)
    assert (paused.reason, paused.granted) == ("QueuePaused", 0)
    night = parse_queue_spec({"maxRunningChunks": 4, "allowedWindows": [{"start": "20:00", "end": "06:00"}]})
    closed = verdict_for("wh", night, [a], a, running=1, now=at("19:59").replace(second=50))
    assert closed.reason == "OutsideAllowedWindow"
    assert closed.wake_after == 10.0  # the window opens in 10 s: look again then
    assert "20:00-06:00" in closed.message
    missing = missing_queue_verdict("wh", wanting=3, running=0)
    assert (missing.reason, missing.granted, missing.waiting) == ("QueueNotFound", 0, 3)


def test_recorded_demand_belongs_to_its_queue() -> None:
    assert recorded_demand({"queue": {"name": "wh", "demand": 3}}, "wh") == 3
    assert recorded_demand({"queue": {"name": "other", "demand": 3}}, "wh") == 0
    assert recorded_demand({"queue": {"name": "wh", "demand": True}}, "wh") == 0
    assert recorded_demand(None, "wh") == 0


def test_a_waiting_backfill_says_so_and_an_event_marks_each_change() -> None:
    verdict = missing_queue_verdict("wh", wanting=2, running=0)
    new = with_queue({"phase": "Queued", "conditions": [{"type": "Succeeded", "status": "Unknown"}]},
                     verdict, 0, None, 1, NOON)  # fmt: skip
    conditions = {c["type"]: c for c in new["conditions"]}
    assert conditions["Queued"]["status"] == "True"
    assert conditions["Queued"]["reason"] == "QueueNotFound"
    assert conditions["Succeeded"]["reason"] == "QueueNotFound"  # what describe and Argo CD show first
    assert new["queue"] == {"name": "wh", "priority": 0, "running": 0, "waiting": 2, "demand": 2,
                            "reason": "QueueNotFound"}  # fmt: skip
    (event,) = queue_events(None, verdict)
    assert (event.type, event.reason) == ("Warning", "QueueNotFound")
    assert queue_events(new, verdict) == []  # still the same: no new Event
    admitted = verdict_for("wh", QueueSpec(2), [member("a", wanting=1)], member("a", wanting=1), 0, NOON)
    (event,) = queue_events(new, admitted)
    assert event.reason == "AdmittedByQueue"
    after = with_queue(new, admitted, 0, new, 1, NOON + timedelta(minutes=1))
    queued = {c["type"]: c for c in after["conditions"]}["Queued"]
    assert (queued["status"], queued["reason"]) == ("False", "Admitted")
    assert queued["lastTransitionTime"] == "2024-03-01T12:01:00Z"


def test_queue_status_lists_members_in_admission_order() -> None:
    rows = [
        QueueRow(member("late", created="2024-02-01T00:00:00Z", running=1), 2),
        QueueRow(member("urgent", priority=3, running=1), 0),
        QueueRow(member("early", running=0), 1),
    ]
    status = queue_status(max_running_chunks=2, opened="Open", problem=None, rows=rows, running=2, generation=4,
                          previous=None, now=NOON)  # fmt: skip
    assert [b["name"] for b in status["backfills"]] == ["urgent", "early", "late"]
    assert (status["running"], status["waiting"], status["backfillCount"]) == (2, 3, 3)
    (admitting,) = status["conditions"]
    assert (admitting["type"], admitting["status"], admitting["observedGeneration"]) == ("Admitting", "True", 4)
    paused = queue_status(max_running_chunks=2, opened="QueuePaused", problem=None, rows=rows, running=2,
                          generation=5, previous=status, now=NOON)  # fmt: skip
    assert paused["conditions"][0]["status"] == "False"
    assert paused["conditions"][0]["reason"] == "QueuePaused"


# --- the reconcile decision cut to the queue's grant ---------------------------------------------


def _decision(state: ChunkState | None = None) -> Decision:
    spec = parse_spec({"startDate": "2024-01-01", "endDate": "2024-01-05", "parallelism": 3,
                       "databaseSecretRef": {"name": "db"}, "queueName": "wh"})  # fmt: skip
    return decide(spec, spec.windows(), state or ChunkState(), [], NOON)


def test_a_fresh_backfill_the_queue_refuses_is_queued_and_launches_nothing() -> None:
    decision = _decision()
    assert len(decision.launch) == 3 and "Started" in {e.reason for e in decision.events}
    refused = admitted_decision(decision, missing_queue_verdict("wh", wanting=3, running=0), NOON)
    assert refused.launch == ()
    assert refused.phase == "Queued"
    assert dict(refused.state.attempts) == {}  # nothing charged: the chunks are simply not started
    assert "Started" not in {e.reason for e in refused.events}
    assert refused.wake_after is not None


def test_a_partial_grant_launches_the_first_chunks_and_keeps_the_rest_due() -> None:
    decision = _decision()
    me = member("me", wanting=3)
    verdict = verdict_for("wh", QueueSpec(1), [me], me, running=0, now=NOON)
    cut = admitted_decision(decision, verdict, NOON)
    assert [item.window.index for item in cut.launch] == [0]
    assert dict(cut.state.attempts) == {0: 1}
    assert cut.phase == "Running"


def test_a_started_backfill_that_waits_stays_running() -> None:
    decision = _decision(ChunkState(succeeded=frozenset({0})))
    me = member("me", wanting=len(decision.launch))
    cut = admitted_decision(decision, verdict_for("wh", QueueSpec(1), [me], me, running=1, now=NOON), NOON)
    assert cut.launch == ()
    assert cut.phase == "Running"  # it holds its overlap claim: an overlapping backfill must not start


def test_a_peer_wants_its_recorded_demand_minus_what_runs_now() -> None:
    def peer(**status: Any) -> dict[str, Any]:
        meta = {"uid": "p", "name": "peer", "creationTimestamp": "2024-01-01T00:00:00Z"}
        return {"metadata": meta, "spec": {"queueName": "wh", "priority": 3}, "status": status}

    running = Counter({"p": 1})
    seen = _member(peer(queue={"name": "wh", "demand": 4}, phase="Running"), "wh", running)
    assert (seen.priority, seen.running, seen.wanting) == (3, 1, 3)
    # Finished: it wants nothing here.
    assert _member(peer(queue={"name": "wh", "demand": 4}, phase="Succeeded"), "wh", running).wanting == 0
    # Nothing on record for this queue (never reconciled, or just moved here): its parallelism
    # (default 1), so its peers leave it its share until its first pass here declares its demand.
    assert _member(peer(), "wh", Counter()).wanting == 1
    assert _member(peer(queue={"name": "old", "demand": 4}, phase="Running"), "wh", running).wanting == 0
    moved = peer(queue={"name": "old", "demand": 4}, phase="Running")
    moved["spec"]["parallelism"] = 3
    assert _member(moved, "wh", Counter()).wanting == 3
    # What its last pass declared under the queue's lock wins over its (lagging) status.
    assert _member(peer(queue={"name": "wh", "demand": 4}, phase="Running"), "wh", running, {"p": 2}).wanting == 1


def test_a_backfill_joining_a_busy_queue_gets_its_fair_share_from_its_first_grant() -> None:
    """The older member holds both slots of a queue of 2 and wants more; the newcomer's first pass
    finds the queue full. When a slot frees, the older member's pass must give it to the
    newcomer, although the newcomer's status (written after the lock) does not yet say it waits."""
    older = member("older", created="2024-01-01T00:00:00Z", running=1, wanting=1)
    newcomer_status: dict[str, Any] = {}  # its first pass ran; its status patch has not landed
    newcomer_item = {"metadata": {"uid": "uid-new", "name": "new", "creationTimestamp": "2024-01-02T00:00:00Z"},
                     "spec": {"queueName": "wh", "parallelism": 2}, "status": newcomer_status}  # fmt: skip
    running = Counter({"uid-older": 1})

    # Before the fix: the peer's demand was what its status recorded; nothing, so the older took the slot.
    stale = member("new", created="2024-01-02T00:00:00Z", wanting=recorded_demand(newcomer_status, "wh"))
    assert verdict_for("wh", QueueSpec(2), [older, stale], older, running=1, now=NOON).granted == 1

    # Now: the demand its first pass declared (under the lock), or if that pass has not yet run
    # its parallelism, makes the older member leave the free slot to the newcomer.
    for declared in ({"uid-new": 2}, {}):
        seen = _member(newcomer_item, "wh", running, declared)
        assert (seen.running, seen.wanting) == (0, 2)
        mine = verdict_for("wh", QueueSpec(2), [older, seen], older, running=1, now=NOON)
        assert (mine.granted, mine.waiting, mine.wake) == (0, 1, ("uid-new",))
        theirs = verdict_for("wh", QueueSpec(2), [older, seen], seen, running=1, now=NOON)
        assert theirs.granted == 1  # the newcomer's own pass, woken, takes it: the ceiling still holds
    # Once both run one, the next free slot goes back to the older: an even split.
    both = [member("older", running=0, wanting=2), member("new", created="2024-01-02T00:00:00Z", running=1, wanting=1)]
    assert admit(QueueSpec(2), both, running=1, now=NOON).grants == {"uid-older": 1, "uid-new": 0}


def test_a_pass_declares_its_demand_for_the_next_passes_and_forgets_members_that_left() -> None:
    view = queue_gate.View(None, QueueSpec(2), None, ({"metadata": {"uid": "uid-a"}},), Counter(), frozenset())
    queue_gate.declare("ns-declare", "wh", replace(view, members=()), member("gone", running=1, wanting=1))
    book = queue_gate.declare("ns-declare", "wh", view, member("a", running=1, wanting=2))
    assert book == {"uid-a": 3}  # "gone" is no member any more
    assert queue_gate.declared("ns-declare", "wh") == {"uid-a": 3}
    assert queue_gate.declared("ns-declare", "other") == {}
