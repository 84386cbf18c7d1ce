"""Admission through a DbtBackfillQueue: how many chunks each member backfill may start now.

Pure: imports neither kopf, kubernetes, SQLAlchemy nor dbt.

A queue caps the chunk Jobs running at once across all the backfills that name it
(``spec.queueName``), so several backfills cannot together overwhelm one warehouse. The
operator computes admission for the whole queue from one view (every member's demand and
every alive chunk Job of the queue), under a per-queue lock (see ``queue_gate.py``); this
module is the decision:

- nothing is admitted while the queue is ``paused`` or the clock (UTC) is outside every
  ``allowedWindows`` entry; chunks already running are never stopped;
- at most ``maxRunningChunks - running`` chunks are admitted, ``running`` counting every alive
  chunk Job of the queue (active, or with a Pod still terminating);
- higher ``spec.priority`` first: a lower priority gets a slot only when no higher one wants it;
- between members of equal priority, fair share: slots go one at a time to the member with the
  fewest chunks running (counting those just granted), the older one (creationTimestamp, then
  name) on a tie. So two equal backfills split a queue evenly, and the older goes first.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import groupby
from typing import Any, Final, Literal

MAX_RUNNING_CHUNKS: Final = 10000
MAX_ALLOWED_WINDOWS: Final = 24
QUEUE_SPEC_FIELDS: Final = frozenset({"maxRunningChunks", "allowedWindows", "paused"})
_WINDOW_FIELDS: Final = frozenset({"start", "end"})
_CLOCK_RE: Final = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
MINUTES_PER_DAY: Final = 24 * 60

Gate = Literal["Open", "QueuePaused", "OutsideAllowedWindow"]
# Why a member backfill has chunks held back (or not), as its Queued condition's reason.
Reason = Literal[
    "Admitted",
    "NotWaiting",
    "WaitingForQueue",
    "QueuePaused",
    "OutsideAllowedWindow",
    "QueueNotFound",
    "QueueInvalid",
]
WAITING_REASONS: Final = frozenset(
    {"WaitingForQueue", "QueuePaused", "OutsideAllowedWindow", "QueueNotFound", "QueueInvalid"}
)


class QueueSpecError(ValueError):
    """A DbtBackfillQueue spec that cannot admit anything. The message is one line."""


@dataclass(frozen=True)
class TimeWindow:
    """Minutes of the day (UTC), ``start`` inclusive, ``end`` exclusive; wraps midnight when
    ``end < start`` (20:00-06:00 is the night)."""

    start: int
    end: int

    def contains(self, minute: int) -> bool:
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end

    def label(self) -> str:
        return f"{_clock(self.start)}-{_clock(self.end)}"


@dataclass(frozen=True)
class QueueSpec:
    max_running_chunks: int
    allowed_windows: tuple[TimeWindow, ...] = ()
    paused: bool = False


def _clock(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


def _minute_of(text: object, where: str) -> int:
    if not isinstance(text, str) or not _CLOCK_RE.fullmatch(text):
        raise QueueSpecError(f"{where}: must be a time of day HH:MM (UTC, 00:00-23:59), got {text!r}")
    hours, minutes = text.split(":")
    return int(hours) * 60 + int(minutes)


def parse_queue_spec(spec: object) -> QueueSpec:
    """Parse and validate a DbtBackfillQueue ``spec`` (the CRD's schema, re-checked)."""
    if not isinstance(spec, Mapping):
        raise QueueSpecError("spec: must be an object")
    unknown = sorted(str(k) for k in spec if k not in QUEUE_SPEC_FIELDS)
    if unknown:
        raise QueueSpecError(f"spec.{unknown[0]}: unknown field; known: {', '.join(sorted(QUEUE_SPEC_FIELDS))}")
    limit = spec.get("maxRunningChunks")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_RUNNING_CHUNKS:
        raise QueueSpecError(f"spec.maxRunningChunks: must be a whole number between 1 and {MAX_RUNNING_CHUNKS}")
    paused = spec.get("paused")
    if paused is not None and not isinstance(paused, bool):
        raise QueueSpecError(f"spec.paused: must be true or false, got {paused!r}")
    raw = spec.get("allowedWindows")
    raw = [] if raw is None else raw
    if not isinstance(raw, list | tuple) or len(raw) > MAX_ALLOWED_WINDOWS:
        raise QueueSpecError(f"spec.allowedWindows: must be a list of at most {MAX_ALLOWED_WINDOWS} windows")
    windows = []
    for i, item in enumerate(raw):
        where = f"spec.allowedWindows[{i}]"
        if not isinstance(item, Mapping) or set(item) != _WINDOW_FIELDS:
            raise QueueSpecError(f"{where}: must be an object with exactly start and end (HH:MM, UTC)")
        window = TimeWindow(_minute_of(item["start"], f"{where}.start"), _minute_of(item["end"], f"{where}.end"))
        if window.start == window.end:
            raise QueueSpecError(f"{where}: start and end must differ (omit allowedWindows to admit all day)")
        windows.append(window)
    return QueueSpec(limit, tuple(windows), bool(paused))


def _minute_of_day(now: datetime) -> int:
    return now.hour * 60 + now.minute


def gate(spec: QueueSpec, now: datetime) -> Gate:
    """Whether the queue admits anything at ``now`` (an aware UTC time)."""
    if spec.paused:
        return "QueuePaused"
    if spec.allowed_windows and not any(w.contains(_minute_of_day(now)) for w in spec.allowed_windows):
        return "OutsideAllowedWindow"
    return "Open"


def seconds_until_open(spec: QueueSpec, now: datetime) -> float | None:
    """Seconds until the next allowed window opens; 0 inside one, None when no window limits it."""
    if not spec.allowed_windows:
        return None
    minute = _minute_of_day(now)
    if any(w.contains(minute) for w in spec.allowed_windows):
        return 0.0
    start_of_minute = now.replace(second=0, microsecond=0)
    ahead = min((w.start - minute) % MINUTES_PER_DAY for w in spec.allowed_windows)
    return (start_of_minute + timedelta(minutes=ahead) - now).total_seconds()


@dataclass(frozen=True)
class Member:
    """One backfill of the queue: ``running`` chunk Jobs alive now, ``wanting`` more to start."""

    uid: str
    name: str
    priority: int
    created: str  # creationTimestamp, RFC 3339 (sorts as text)
    running: int
    wanting: int


@dataclass(frozen=True)
class Admission:
    grants: Mapping[str, int]  # uid -> chunks it may start now
    gate: Gate
    running: int
    free: int  # slots left after the grants


def admission_order(members: Sequence[Member]) -> list[Member]:
    """Priority (highest first), then age (oldest first), then name."""
    return sorted(members, key=lambda m: (-m.priority, m.created, m.name, m.uid))


def admit(spec: QueueSpec, members: Sequence[Member], running: int, now: datetime) -> Admission:
    """Grant the queue's free slots to its members.

    ``running`` counts every alive chunk Job of the queue, including Jobs of backfills no longer
    listed (deleted, or moved to another queue) whose Pods still run: they take warehouse
    capacity until their Pods are gone.
    """
    grants = {m.uid: 0 for m in members}
    opened = gate(spec, now)
    free = max(0, spec.max_running_chunks - running) if opened == "Open" else 0
    for _, group in groupby(admission_order(members), key=lambda m: m.priority):
        if free <= 0:
            break
        level = list(group)  # already oldest first
        while free > 0:
            candidates = [m for m in level if grants[m.uid] < m.wanting]
            if not candidates:
                break
            # min() keeps the first of equals: the oldest, since the level is in age order.
            chosen = min(candidates, key=lambda m: m.running + grants[m.uid])
            grants[chosen.uid] += 1
            free -= 1
    return Admission(grants, opened, running, free)


@dataclass(frozen=True)
class Verdict:
    """What the queue says to one member backfill on this pass."""

    queue: str
    granted: int
    waiting: int  # chunks it would start now (within its parallelism) that the queue holds back
    demand: int  # chunks it would run at once if the queue did not limit it
    running: int
    reason: Reason
    message: str
    wake_after: float | None = None  # look again then (a window opens; a periodic re-check)
    wake: tuple[str, ...] = ()  # uids of other members granted slots on this pass


# A member waiting on its queue looks again this often even if no event wakes it (a Job of a
# deleted peer ending frees a slot without waking anyone).
WAITING_RECHECK_SECONDS: Final = 30.0


def verdict_for(
    queue: str, spec: QueueSpec, members: Sequence[Member], me: Member, running: int, now: datetime
) -> Verdict:
    """Admit the whole queue, and tell ``me`` (one of ``members``) its share."""
    result = admit(spec, members, running, now)
    granted = result.grants.get(me.uid, 0)
    waiting = me.wanting - granted
    wake = tuple(m.uid for m in members if m.uid != me.uid and result.grants.get(m.uid, 0) > 0)
    demand = me.running + me.wanting
    if waiting <= 0:
        reason: Reason = "Admitted" if me.wanting else "NotWaiting"
        message = f"queue {queue} admits its chunks ({running + granted}/{spec.max_running_chunks} running)"
        return Verdict(queue, granted, 0, demand, me.running, reason, message, None, wake)
    if result.gate == "QueuePaused":
        reason, message = "QueuePaused", f"queue {queue} is paused; {waiting} chunk(s) wait"
        wake_after: float | None = None  # unpausing is a spec change: the queue's event wakes members
    elif result.gate == "OutsideAllowedWindow":
        windows = ", ".join(w.label() for w in spec.allowed_windows)
        reason, message = "OutsideAllowedWindow", f"queue {queue} admits chunks only {windows} UTC; {waiting} wait"
        wake_after = seconds_until_open(spec, now)
    else:
        reason = "WaitingForQueue"
        message = (
            f"queue {queue} is full ({running + sum(result.grants.values())}/{spec.max_running_chunks} running "
            f"or admitted); {waiting} chunk(s) wait"
        )
        wake_after = None
    recheck = WAITING_RECHECK_SECONDS if wake_after is None else min(max(wake_after, 1.0), WAITING_RECHECK_SECONDS)
    return Verdict(queue, granted, waiting, demand, me.running, reason, message, recheck, wake)


def missing_queue_verdict(queue: str, wanting: int, running: int, problem: str | None = None) -> Verdict:
    """The queue does not exist (it may be created later), or its spec cannot be read: wait."""
    if problem is None:
        reason: Reason = "QueueNotFound"
        message = f"DbtBackfillQueue {queue} does not exist in this namespace; chunks wait until it does"
    else:
        reason, message = "QueueInvalid", f"DbtBackfillQueue {queue} cannot admit chunks: {problem}"
    return Verdict(queue, 0, wanting, running + wanting, running, reason, message, WAITING_RECHECK_SECONDS)


def current_demand(status: Mapping[str, Any] | None, queue: str, declared: int | None, parallelism: int) -> int:
    """A member's demand as the admitting pass should count it.

    What the member declared on its last pass under the queue's lock (``declared``) is current:
    a member's demand changes only on its own pass. Without it (not seen by this process, e.g.
    after a restart) its status tells, but the status is written after the lock is let go, so it
    lags. A member with nothing on record for this queue (just created or just moved here, its
    first pass here still to come) counts as wanting its ``parallelism``: at worst a slot stays
    free until that pass, which comes at once; counted as wanting nothing, it would find the
    queue taken by its peers and miss its share.
    """
    if declared is not None:
        return max(0, declared)
    block = (status or {}).get("queue") or {}
    if block.get("name") != queue or "demand" not in block:
        return max(0, parallelism)
    return recorded_demand(status, queue)


def recorded_demand(status: Mapping[str, Any] | None, queue: str) -> int:
    """The demand a member recorded in its status on its last pass (0 if in another queue)."""
    block = (status or {}).get("queue") or {}
    if block.get("name") != queue:
        return 0
    value = block.get("demand")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def recorded_waiting(status: Mapping[str, Any] | None, queue: str) -> int:
    block = (status or {}).get("queue") or {}
    value = block.get("waiting") if block.get("name") == queue else 0
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
