"""kopf handlers: thin glue between Kubernetes events and the reconciler.

- ``on_create`` rejects a spec that can never run (PermanentError, Failed status, no Jobs).
- ``backfill_daemon`` is each DbtBackfill's reconcile loop. Job and CR events only wake
  it, so a burst of events becomes one pass and one coalesced status patch.
- ``on_job_event`` is the watch on our Jobs: it wakes the owner. The API server filters
  that watch by label (``settings.watching.label_selectors``), so other Jobs, and our
  finished Jobs once labelled settled, never stream.
- ``on_delete`` (the finalizer) deletes the Jobs, waits until none of their Pods is left,
  and closes the audit row.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, Final

import kopf

from dbtbackfill.core.spec import SpecError, parse_spec
from dbtbackfill.operator import controller, jobs, kube, metrics, reconcile, worker_pools
from dbtbackfill.operator import status as status_core
from dbtbackfill.operator.kube import GROUP, PLURAL, VERSION

FINALIZER_AUDIT_DEADLINE_SECONDS: Final = 30.0
# A Pod stuck terminating (a lost node) must not keep a deleted backfill forever.
FINALIZER_PODS_DEADLINE_SECONDS: Final = 600.0
WATCH_TIMEOUT_SECONDS: Final = int(os.environ.get("DBT_BACKFILL_WATCH_TIMEOUT_SECONDS", "300"))
CONFIG: Final = controller.OperatorConfig.from_env()
POOLS: Final = CONFIG.pools
AUDIT: Final = controller.AuditLog(CONFIG.database_url, POOLS.audit_pool_size, POOLS.audit_max_overflow)
# Passes run here, never on asyncio's default executor; SLOTS hands it no more than it has threads.
PASS_EXECUTOR: Final = ThreadPoolExecutor(max_workers=POOLS.reconcile_workers, thread_name_prefix="reconcile")
SLOTS: Final = worker_pools.PassSlots(POOLS.reconcile_workers, POOLS.first_pass_slots)

# Per-backfill wake-up flags (keyed by uid), the last phase seen for the gauge, and what each
# chunk Job (by uid) last showed a pass.
_wakeups: dict[str, asyncio.Event] = {}
_phases: dict[str, str] = {}
_job_keys: dict[str, jobs.WakeKey] = {}


def _wake(uid: str | None) -> None:
    if uid and uid in _wakeups:
        _wakeups[uid].set()


def wake(uid: str | None) -> None:
    """Wake a backfill's daemon (from another handler module, e.g. ``queue_handlers``)."""
    _wake(uid)


def _record_phase(uid: str, phase: str | None) -> None:
    if phase:
        _phases[uid] = phase
    else:
        _phases.pop(uid, None)
    counts = Counter(_phases.values())
    for name in ("Pending", "Queued", "Running", "Succeeded", "Failed", "Suspended"):
        metrics.BACKFILLS.labels(phase=name).set(counts.get(name, 0))


@kopf.on.startup()
def configure_kopf(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Our own Events tell the story; kopf's per-handler "succeeded" chatter would bury it
    # (and cost an API write per handler run).
    settings.posting.level = logging.WARNING
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.watching.server_timeout = WATCH_TIMEOUT_SECONDS
    settings.watching.client_timeout = WATCH_TIMEOUT_SECONDS + 10
    # Server-side: the Job watch-stream asks for ?labelSelector=, instead of streaming every Job
    # of the cluster to filter here (a handler's labels= filter is applied client-side).
    # Settled Jobs (finished, their end recorded in the status) are left out as well.
    settings.watching.label_selectors["batch", "jobs"] = jobs.WATCH_SELECTOR
    # on_create and on_delete run on kopf's executor; the client pools count its threads too.
    settings.execution.max_workers = POOLS.handler_workers
    kube.configure_pool(POOLS.api_connections)


@kopf.on.create(GROUP, VERSION, PLURAL)
def on_create(spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta, patch: kopf.Patch, **_: Any) -> None:
    try:
        parse_spec(dict(spec))
    except SpecError as exc:
        now = datetime.now(UTC).replace(microsecond=0)
        patch.status.update(status_core.invalid_spec_status(str(exc), meta.get("generation"), dict(status), now))
        raise kopf.PermanentError(f"invalid spec, no Job will be created: {exc}") from exc


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=2.0)
async def backfill_daemon(
    name: str,
    namespace: str | None,
    uid: str,
    stopped: kopf.DaemonStopped,
    logger: kopf.Logger,
    body: kopf.Body,
    **_: Any,
) -> None:
    wake = _wakeups.setdefault(uid, asyncio.Event())
    failures = 0  # consecutive passes that hit an API error: the backoff grows with them
    # A backfill without a phase that this daemon has not passed yet is new: its first pass
    # waits behind passes of started backfills (kopf's body may lag behind our own patch).
    first = not (body.get("status") or {}).get("phase")
    known_version: str | None = None  # the backfill's version as the last pass left it
    try:
        while not stopped:
            wake.clear()
            try:
                async with SLOTS.slot(first=first):
                    # kopf replaces the live body on its loop; the pass gets a copy of it as of now
                    # (only worth making when the pass may use it: see controller._current_body).
                    cached = copy.deepcopy(dict(body)) if known_version is not None else None
                    outcome = await asyncio.get_running_loop().run_in_executor(
                        PASS_EXECUTOR,
                        controller.reconcile_backfill,
                        namespace or "",
                        name,
                        CONFIG,
                        AUDIT,
                        cached,
                        known_version,
                    )
                first = False
                known_version = outcome.resource_version
            except Exception as exc:  # the API (or anything else) failed where no status could say so
                outcome = controller.Outcome(
                    None, (reconcile.Event("Warning", "ReconcileFailed", str(exc)[:1024]),), body, api_failed=True
                )
            failures = failures + 1 if outcome.api_failed else 0
            wake_after = outcome.wake_after
            if outcome.api_failed:
                backoff = reconcile.api_backoff(failures)
                wake_after = backoff if wake_after is None else max(min(wake_after, backoff), 1.0)
                logger.warning("reconcile hit an API error (%d in a row); retrying in %.0fs", failures, wake_after)
            for event in outcome.events:
                kopf.event(body, type=event.type, reason=event.reason, message=event.message)
            for other in outcome.wake:
                _wake(other)
            _record_phase(uid, outcome.phase)
            if outcome.body is None and outcome.phase is None and wake_after is None:
                return  # gone, or being deleted: the finalizer takes over
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=wake_after)
    finally:
        _wakeups.pop(uid, None)


# Event handlers are async so they run on the loop that owns the daemons' asyncio.Events:
# setting one from kopf's worker threads would not wake its waiter.
@kopf.on.event(GROUP, VERSION, PLURAL)
async def on_backfill_event(body: kopf.Body, meta: kopf.Meta, uid: str | None, **_: Any) -> None:
    # Spec changes (suspend, retryFailed) wake this backfill; a finished one may free
    # queued peers, so it wakes the backfills that have not started.
    observed = (body.get("status") or {}).get("observedGeneration")
    if meta.get("generation") != observed:
        _wake(uid)
    if (body.get("status") or {}).get("phase") in ("Succeeded", "Failed", "Cancelled") or meta.get("deletionTimestamp"):
        for other in reconcile.waiting_for_peers(_phases, list(_wakeups)):
            _wake(other)


@kopf.on.event("batch", "v1", "jobs", labels={jobs.LABEL_BACKFILL_UID: kopf.PRESENT})
async def on_job_event(type: str | None, body: kopf.Body, labels: kopf.Labels, uid: str | None, **_: Any) -> None:
    # Only a change a pass would act on wakes the owner (a Job finishing, failing, going):
    # every pass costs API calls, and a finished Job's pass must not queue behind needless ones.
    owner = labels.get(jobs.LABEL_BACKFILL_UID)
    if type == "DELETED":
        # Also how the watch reports a Job labelled settled (it left the selector).
        _job_keys.pop(uid or "", None)
        if jobs.deletion_wakes(body):
            _wake(owner)
        return
    key = jobs.wake_key(body)
    if key is None or uid is None:
        _wake(owner)
        return
    if _job_keys.get(uid, jobs.JUST_CREATED) != key:
        _wake(owner)
    _job_keys[uid] = key


def _seconds_since(timestamp: Any) -> float:
    if not timestamp:
        return 0.0
    return (datetime.now(UTC) - datetime.fromisoformat(str(timestamp).replace("Z", "+00:00"))).total_seconds()


@kopf.on.delete(GROUP, VERSION, PLURAL)
def on_delete(body: kopf.Body, uid: str, meta: kopf.Meta, logger: kopf.Logger, **_: Any) -> None:
    _record_phase(uid, None)
    waited = _seconds_since(meta.get("deletionTimestamp"))
    try:
        done = controller.finalize_backfill(body, AUDIT)
    except kube.ApiFailure as exc:
        raise kopf.TemporaryError(f"cannot clean up the chunk Jobs yet: {exc}", delay=10) from exc
    if done.alive:
        if waited < FINALIZER_PODS_DEADLINE_SECONDS:
            raise kopf.TemporaryError(f"waiting for {done.alive} chunk Job(s) and their Pods to terminate", delay=2)
        logger.error(
            "%d chunk Job(s) still terminating after %.0fs; releasing the finalizer (audit row left open)",
            done.alive,
            waited,
        )
        return
    if done.audit_written:
        return
    if waited < FINALIZER_AUDIT_DEADLINE_SECONDS:
        raise kopf.TemporaryError("audit database unreachable; will retry marking the row cancelled", delay=5)
    logger.error("audit database unreachable for %.0fs; releasing the finalizer without the audit row", waited)
