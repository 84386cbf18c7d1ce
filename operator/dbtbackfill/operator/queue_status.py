"""Status of a DbtBackfillQueue, and what a member DbtBackfill's status says about its queue.

Pure: imports neither kopf, kubernetes, SQLAlchemy nor dbt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from dbtbackfill.operator import status as status_core
from dbtbackfill.operator.queue_admission import WAITING_REASONS, Gate, Member, Verdict, admission_order
from dbtbackfill.operator.reconcile import Event

QUEUED_CONDITION: Final = "Queued"
ADMITTING_CONDITION: Final = "Admitting"
# The queue's status lists its members; past this many, the rest are only counted.
MAX_LISTED_BACKFILLS: Final = 200


def _conditions_by_type(status: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    return {str(c.get("type")): c for c in (status or {}).get("conditions") or []}


def backfill_queue_block(verdict: Verdict, priority: int) -> dict[str, Any]:
    """``status.queue`` of a member backfill: its share of the queue on the last pass.

    ``demand`` (chunks it would run at once) lets the passes of its peers count what it still
    wants without reading its spec and plan: demand minus its alive Jobs."""
    return {
        "name": verdict.queue,
        "priority": priority,
        "running": verdict.running + verdict.granted,
        "waiting": verdict.waiting,
        "demand": verdict.demand,
        "reason": verdict.reason,
    }


def with_queue(
    new: Mapping[str, Any],
    verdict: Verdict,
    priority: int,
    previous: Mapping[str, Any] | None,
    generation: int | None,
    now: datetime,
) -> dict[str, Any]:
    """``new`` plus ``status.queue`` and the ``Queued`` condition (True while chunks wait).

    A backfill that has not started and waits only on its queue is in phase Queued; its
    ``Succeeded`` condition then says why, as it does for an overlapping peer."""
    out = dict(new)
    out["queue"] = backfill_queue_block(verdict, priority)
    waiting = verdict.reason in WAITING_REASONS
    prev = _conditions_by_type(previous)
    queued = status_core._condition(
        QUEUED_CONDITION,
        "True" if waiting else "False",
        verdict.reason,
        verdict.message[:1024],
        generation,
        prev,
        now,
    )
    conditions = [dict(c) for c in out.get("conditions") or [] if c.get("type") != QUEUED_CONDITION]
    if out.get("phase") == "Queued" and not out.get("queuedBehind"):
        for c in conditions:
            if c.get("type") == "Succeeded":
                c.update(reason=verdict.reason, message=verdict.message[:1024])
    out["conditions"] = [*conditions, queued]
    return out


def queue_events(previous: Mapping[str, Any] | None, verdict: Verdict) -> list[Event]:
    """An Event when the backfill starts waiting on its queue, waits for another reason, or is
    admitted again; nothing while the situation stays the same."""
    before = _conditions_by_type(previous).get(QUEUED_CONDITION) or {}
    was = before.get("reason") if before.get("status") == "True" else None
    now_waiting = verdict.reason in WAITING_REASONS
    if now_waiting and verdict.reason != was:
        if verdict.reason in ("QueueNotFound", "QueueInvalid"):
            return [Event("Warning", verdict.reason, verdict.message)]
        return [Event("Normal", verdict.reason, verdict.message)]
    if was and verdict.reason == "Admitted":
        return [Event("Normal", "AdmittedByQueue", verdict.message)]
    return []


@dataclass(frozen=True)
class QueueRow:
    """One member as the queue's status lists it."""

    member: Member
    waiting: int


def queue_status(
    *,
    max_running_chunks: int | None,
    opened: Gate | None,
    problem: str | None,
    rows: Sequence[QueueRow],
    running: int,
    generation: int | None,
    previous: Mapping[str, Any] | None,
    now: datetime,
) -> dict[str, Any]:
    """The queue's whole ``.status``. ``running`` counts every alive chunk Job of the queue
    (a member's own Jobs, and those of backfills gone from it whose Pods still run)."""
    ordered = admission_order([r.member for r in rows])
    waiting_of = {r.member.uid: r.waiting for r in rows}
    listed = [
        {"name": m.name, "priority": m.priority, "running": m.running, "waiting": waiting_of[m.uid]}
        for m in ordered[:MAX_LISTED_BACKFILLS]
    ]
    waiting = sum(waiting_of.values())
    if problem is not None:
        admitting = ("False", "QueueInvalid", problem[:1024])
    elif opened == "Open":
        admitting = ("True", "Open", f"{running}/{max_running_chunks} chunk(s) running, {waiting} waiting")
    elif opened == "QueuePaused":
        admitting = ("False", "QueuePaused", "spec.paused is true; running chunks finish, none start")
    else:
        admitting = ("False", "OutsideAllowedWindow", "outside spec.allowedWindows (UTC); none start")
    prev = _conditions_by_type(previous)
    return {
        "observedGeneration": generation,
        "running": running,
        "waiting": waiting,
        "backfills": listed,
        "backfillCount": len(rows),
        "conditions": [status_core._condition(ADMITTING_CONDITION, *admitting, generation, prev, now)],  # type: ignore[arg-type]
    }
