"""kopf handlers for DbtBackfillQueue: wake the member backfills when their queue appears, goes
or changes its spec, and when a member is deleted (its slots are free).

Admission itself runs in each member's reconcile pass (``queue_gate``); the queue needs no
daemon of its own. Only an event handler runs here, so kopf keeps no finalizer, progress or
diff-base annotation on queues (the operator never patches a queue, only its status).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import kopf

from dbtbackfill.operator import handlers, kube, queue_gate
from dbtbackfill.operator.kube import GROUP, QUEUE_PLURAL, VERSION

# Event types on which the queue's members may see something new: the initial listing (None),
# the queue appearing or going away. Status-only changes (our own patches) do not count.
_MEMBERSHIP_EVENTS = (None, "ADDED", "DELETED")


async def _refresh_and_wake(namespace: str, queue: str, logger: kopf.Logger) -> None:
    try:
        members = await asyncio.to_thread(queue_gate.refresh, namespace, queue, datetime.now(UTC))
    except kube.ApiFailure as exc:
        # The members still re-check on their own (queue_admission.WAITING_RECHECK_SECONDS).
        logger.warning("cannot refresh DbtBackfillQueue %s: %s", queue, exc)
        return
    for uid in members:
        handlers.wake(uid)


@kopf.on.event(GROUP, VERSION, QUEUE_PLURAL)
async def on_queue_event(
    type: str | None, name: str, namespace: str | None, meta: kopf.Meta, status: kopf.Status, logger: kopf.Logger,
    **_: Any,
) -> None:  # fmt: skip
    spec_changed = meta.get("generation") != status.get("observedGeneration")
    if type not in _MEMBERSHIP_EVENTS and not spec_changed:
        return
    await _refresh_and_wake(namespace or "", name, logger)


@kopf.on.event(GROUP, VERSION, kube.PLURAL, when=lambda spec, **_: bool(spec.get("queueName")))
async def on_member_event(
    type: str | None, namespace: str | None, spec: kopf.Spec, logger: kopf.Logger, **_: Any
) -> None:
    """A member backfill is gone (its finalizer waited for its Pods): its slots are free now, and
    no Job event of it wakes anyone, so the queue's other members are woken here."""
    if type != "DELETED":
        return
    await _refresh_and_wake(namespace or "", str(spec.get("queueName")), logger)
