"""The I/O around queue admission: one consistent view of a DbtBackfillQueue, under its lock.

Why the ceiling holds although kopf reconciles each backfill on its own: every pass of a
queued backfill takes the queue's lock (one per namespace/queue, in this process), then lists
the queue's alive chunk Jobs from the API server (label ``dbt-backfill.io/queue``; a list
without resourceVersion is a consistent read), computes the whole queue's admission
(:func:`dbtbackfill.operator.queue_admission.verdict_for`) and creates its own admitted Jobs, all
before it lets go. The next pass, of any member, lists after those creates and counts them.
Two passes can therefore never both take the last free slot.

This assumes a single operator process serves the namespace, which the shipped install
guarantees (one replica, Recreate strategy; with kopf peering, only the active peer runs
handlers). Two operators serving one namespace would each hold only their own lock.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from dbtbackfill.operator import jobs, kube, queue_admission, queue_status, status
from dbtbackfill.operator.jobs import Owner
from dbtbackfill.operator.queue_admission import Member, QueueSpec, QueueSpecError, Verdict
from dbtbackfill.operator.reconcile import JobView

log = logging.getLogger(__name__)
TERMINAL: Final = frozenset({"Succeeded", "Failed", "Cancelled"})

_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_guard = threading.Lock()
# Each member's demand (running + wanting) as its last pass declared it, per queue; read and
# written only under that queue's lock, so every pass admits against its peers' current demand.
_declared: dict[tuple[str, str], dict[str, int]] = {}


@contextmanager
def hold(namespace: str, queue: str | None) -> Iterator[None]:
    """The queue's admission lock (nothing to hold for a backfill outside any queue)."""
    if queue is None:
        yield
        return
    with _locks_guard:
        lock = _locks.setdefault((namespace, queue), threading.Lock())
    with lock:
        yield


def selector(queue: str) -> str:
    # A settled Job is never alive (its end is in status and no Pod of it runs): not listed.
    return f"{jobs.LABEL_QUEUE}={queue},!{jobs.LABEL_SETTLED}"


@dataclass(frozen=True)
class View:
    body: Mapping[str, Any] | None  # the DbtBackfillQueue, None if missing
    spec: QueueSpec | None
    problem: str | None  # why its spec cannot admit anything
    members: tuple[Mapping[str, Any], ...]  # DbtBackfills naming the queue, not being deleted
    running: Counter[str]  # alive chunk Jobs of the queue, by backfill uid
    names: frozenset[str]  # their Job names


def _alive(view: JobView) -> bool:
    return view.alive or view.deleting


def _int(value: Any, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def observe(namespace: str, queue: str) -> View:
    """The queue, its members and its alive chunk Jobs, read now. Raises :class:`kube.ApiFailure`."""
    body = kube.get_queue(namespace, queue)
    spec, problem = None, None
    if body is not None:
        try:
            spec = queue_admission.parse_queue_spec(body.get("spec") or {})
        except QueueSpecError as exc:
            problem = str(exc)
    members = tuple(
        item
        for item in kube.list_backfills(namespace)
        if (item.get("spec") or {}).get("queueName") == queue and not item["metadata"].get("deletionTimestamp")
    )
    running: Counter[str] = Counter()
    names = set()
    for job in kube.list_jobs(namespace, selector(queue)):
        view = jobs.job_view(job)
        if view is not None and _alive(view):
            uid = ((job.get("metadata") or {}).get("labels") or {}).get(jobs.LABEL_BACKFILL_UID, "")
            running[uid] += 1
            names.add(view.name)
    return View(body, spec, problem, members, running, frozenset(names))


def _member(
    item: Mapping[str, Any], queue: str, running: Counter[str], declared: Mapping[str, int] | None = None
) -> Member:
    """A peer with the demand its last pass declared under the queue's lock (``declared``), or
    failing that (not seen by this process yet) the demand its status records."""
    meta = item["metadata"]
    spec = item.get("spec") or {}
    item_status = item.get("status") or {}
    uid = meta.get("uid", "")
    parallelism = _int(spec.get("parallelism"), 1)
    demand = queue_admission.current_demand(item_status, queue, (declared or {}).get(uid), parallelism)
    if spec.get("suspend") is True or item_status.get("phase") in TERMINAL:
        demand = 0
    return Member(
        uid=uid,
        name=meta.get("name", ""),
        priority=_int(spec.get("priority")),
        created=meta.get("creationTimestamp") or "",
        running=running[uid],
        wanting=max(0, demand - running[uid]),
    )


def admit(
    namespace: str, owner: Owner, created: str, priority: int, queue: str, own: Sequence[JobView], wanting: int,
    now: datetime,
) -> tuple[Verdict, View, Member]:  # fmt: skip
    """This backfill's share of the queue. Call under :func:`hold`; create the granted Jobs before
    releasing it. ``own`` are the backfill's Jobs: alive ones started before it joined the queue
    (so without the queue's label) count against the ceiling too."""
    view = observe(namespace, queue)
    unlabelled = sum(1 for j in own if _alive(j) and j.name not in view.names)
    mine = view.running[owner.uid] + unlabelled
    me = Member(owner.uid, owner.name, priority, created, mine, wanting)
    if view.spec is None:
        problem = view.problem if view.body else None
        return queue_admission.missing_queue_verdict(queue, wanting, mine, problem), view, me
    demands = declare(namespace, queue, view, me)
    peers = [m for item in view.members if (m := _member(item, queue, view.running, demands)).uid != owner.uid]
    total = sum(view.running.values()) + unlabelled
    return queue_admission.verdict_for(queue, view.spec, [*peers, me], me, total, now), view, me


def declare(namespace: str, queue: str, view: View, me: Member) -> dict[str, int]:
    """Record ``me``'s current demand for the queue's later passes (call under :func:`hold`) and
    return every member's declared demand; members that left the queue are forgotten."""
    book = _declared.setdefault((namespace, queue), {})
    listed = {str(item["metadata"].get("uid", "")) for item in view.members} | {me.uid}
    for uid in [u for u in book if u not in listed]:
        del book[uid]
    book[me.uid] = me.running + me.wanting
    return dict(book)


def declared(namespace: str, queue: str) -> dict[str, int]:
    """The members' declared demand (call under :func:`hold`)."""
    return dict(_declared.get((namespace, queue), {}))


def _rows(
    view: View, queue: str, mine: tuple[str, Member, int] | None, demands: Mapping[str, int]
) -> list[queue_status.QueueRow]:
    rows = []
    for item in view.members:
        member = _member(item, queue, view.running, demands)
        waiting = queue_admission.recorded_waiting(item.get("status"), queue)
        if mine is not None and member.uid == mine[0]:
            member, waiting = mine[1], mine[2]
        rows.append(queue_status.QueueRow(member, waiting))
    return rows


def publish(namespace: str, queue: str, view: View, now: datetime, mine: tuple[str, Member, int] | None = None) -> None:
    """Write the queue's status from ``view`` (with this pass's own numbers, ``mine``), if it changed.

    Best effort: a failure here is logged, never charged to the backfill whose pass it is."""
    if view.body is None:
        return
    extra = mine[1].running - view.running[mine[0]] if mine else 0
    previous = dict(view.body.get("status") or {})
    new = queue_status.queue_status(
        max_running_chunks=view.spec.max_running_chunks if view.spec else None,
        opened=queue_admission.gate(view.spec, now) if view.spec else None,
        problem=view.problem,
        rows=_rows(view, queue, mine, declared(namespace, queue)),
        running=sum(view.running.values()) + max(0, extra),
        generation=view.body["metadata"].get("generation"),
        previous=previous,
        now=now,
    )
    patch = status.changed(previous, new)
    if not patch:
        return
    try:
        kube.patch_queue_status(namespace, queue, patch)
    except kube.ApiFailure as exc:
        log.warning("cannot update the status of DbtBackfillQueue %s/%s: %s", namespace, queue, exc)


def publish_pass(namespace: str, me: Member, view: View, verdict: Verdict, now: datetime) -> None:
    """The queue's status after a member's pass, still under :func:`hold`: its Jobs now include
    the ones just created."""
    after = Member(me.uid, me.name, me.priority, me.created, verdict.running + verdict.granted, 0)
    publish(namespace, verdict.queue, view, now, (me.uid, after, verdict.waiting))


def refresh(namespace: str, queue: str, now: datetime) -> list[str]:
    """Re-read and publish the queue's status (its spec changed, it appeared or went away).
    Returns the uids of the member backfills to wake: any may now be admitted, or must learn
    that its queue is gone."""
    with hold(namespace, queue):
        view = observe(namespace, queue)
        publish(namespace, queue, view, now)
    return [str(item["metadata"].get("uid")) for item in view.members if item["metadata"].get("uid")]
