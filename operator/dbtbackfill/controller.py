"""One reconcile pass for one DbtBackfill: read, decide (pure), act, record.

The I/O shell around :func:`dbtbackfill.reconcile.decide`: it reads the CR and its Jobs,
asks the pure core what to do, creates/deletes Jobs, writes the audit log and patches
``.status`` once, with only what changed.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Final, cast

import kopf

from dbtbackfill import jobs, kube, metrics, policy, reconcile, status
from dbtbackfill.jobs import JobDefaults, Owner
from dbtbackfill.policy import JobPolicy
from dbtbackfill.reconcile import ChunkState, Event, JobView
from dbtbackfill.spec import BackfillSpec, SpecError, parse_spec

log = logging.getLogger(__name__)
IDLE_SECONDS: Final = 300.0
# A missing or unlabelled database Secret can be fixed without touching the backfill.
SECRET_RECHECK_SECONDS: Final = 60.0
AUDIT_CONNECT_TIMEOUT: Final = 3
AUDIT_RETRY_SECONDS: Final = 15.0


@dataclass(frozen=True)
class OperatorConfig:
    defaults: JobDefaults
    database_url: str | None
    policy: JobPolicy

    @classmethod
    def from_env(cls) -> OperatorConfig:
        """Raises :class:`policy.PolicyConfigError` on a malformed policy setting."""
        defaults = JobDefaults(
            image=os.environ.get("DBT_BACKFILL_DEFAULT_IMAGE", "dbt-backfill-operator:0.1.0"),
            service_account_name=os.environ.get("DBT_BACKFILL_JOB_SERVICE_ACCOUNT", "dbt-backfill-job"),
        )
        job_policy = policy.build_policy(
            defaults.image,
            defaults.service_account_name,
            os.environ.get(policy.ALLOWED_IMAGES_ENV),
            os.environ.get(policy.ALLOWED_SERVICE_ACCOUNTS_ENV),
        )
        return cls(defaults, os.environ.get("DATABASE_URL") or None, job_policy)


@dataclass(frozen=True)
class Outcome:
    """What the daemon needs after a pass: when to look again, and what to tell the user."""

    wake_after: float | None  # None: nothing more to do until something changes
    events: tuple[Event, ...]
    body: Mapping[str, Any] | None
    phase: str | None = None


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


# ----------------------------------------------------------------------------- audit


class AuditLog:
    """The operator's side of ``backfill_executions``. Every write is an idempotent upsert
    keyed by a UUIDv5 of the backfill, so retrying until it lands never duplicates."""

    def __init__(self, database_url: str | None) -> None:
        self.url = database_url

    def _engine(self) -> Any:
        from dbtbackfill import audit

        assert self.url is not None
        engine = audit.engine_for(self.url, connect_timeout=AUDIT_CONNECT_TIMEOUT)
        audit.ensure_schema(engine)
        return engine

    def chunk_rows(self, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, tuple[int | None, str | None]]:
        if not self.url or not ids:
            return {}
        import sqlalchemy as sa

        from dbtbackfill.audit import BackfillExecution as Row

        try:
            with self._engine().connect() as conn:
                query = sa.select(Row.id, Row.records_processed, Row.error_message).where(Row.id.in_(ids))
                return {r.id: (r.records_processed, r.error_message) for r in conn.execute(query)}
        except Exception as exc:  # the database being down must not stop the backfill
            metrics.AUDIT_WRITE_FAILURES.inc()
            log.warning("audit: cannot read chunk rows (will use Job conditions): %s", exc)
            return {}

    def start(self, owner: Owner, spec: BackfillSpec) -> bool:
        if not self.url:
            return True
        from dbtbackfill import audit

        try:
            audit.record_start(
                self._engine(),
                audit.ExecutionStart(
                    id=jobs.backfill_execution_id(owner),
                    kind="backfill",
                    start_date=spec.start_date,
                    end_date=spec.end_date,
                    tenant_id=spec.tenant_id,
                    models=spec.models,
                    backfill_name=owner.name,
                    backfill_namespace=owner.namespace,
                    backfill_uid=owner.uid,
                ),
            )
            return True
        except Exception as exc:
            metrics.AUDIT_WRITE_FAILURES.inc()
            log.warning("audit: start of %s/%s not written yet, will retry: %s", owner.namespace, owner.name, exc)
            return False

    def finish(self, owner: Owner, outcome: str, seconds: float | None, message: str | None) -> bool:
        if not self.url:
            return True
        import sqlalchemy as sa

        from dbtbackfill import audit
        from dbtbackfill.audit import BackfillExecution as Row

        parent = jobs.backfill_execution_id(owner)
        try:
            engine = self._engine()
            with engine.connect() as conn:
                records = conn.execute(
                    sa.select(sa.func.coalesce(sa.func.sum(Row.records_processed), 0)).where(
                        Row.parent_id == parent, Row.status == "completed"
                    )
                ).scalar_one()
            audit.record_finish(
                engine,
                parent,
                outcome,  # type: ignore[arg-type]
                duration_seconds=seconds,
                records_processed=int(records),
                error_message=message,
            )
            return True
        except Exception as exc:
            metrics.AUDIT_WRITE_FAILURES.inc()
            log.warning("audit: finish of %s/%s not written yet, will retry: %s", owner.namespace, owner.name, exc)
            return False


# ----------------------------------------------------------------------------- pass


def owner_of(body: Mapping[str, Any]) -> Owner:
    meta = body["metadata"]
    return Owner(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])


def _enrich(views: list[JobView], owner: Owner, state: ChunkState, auditlog: AuditLog) -> list[JobView]:
    """Records and dbt's error text come from the chunk's audit row, which the Job wrote."""
    finished = [v for v in views if v.phase != "active" and v.chunk not in state.succeeded]
    rows = auditlog.chunk_rows([jobs.chunk_execution_id(owner, v.chunk, v.attempt) for v in finished])
    out = []
    for v in views:
        records, error = rows.get(jobs.chunk_execution_id(owner, v.chunk, v.attempt), (None, None))
        out.append(replace(v, records=records, message=error or v.message))
    return out


def _peers(namespace: str) -> list[reconcile.Peer]:
    return [peer for item in kube.list_backfills(namespace) if (peer := reconcile.peer_of(item))]


def enforce_policy(namespace: str, spec: BackfillSpec, job_policy: JobPolicy) -> None:
    """Raise :class:`policy.PolicyRefusal` unless the operator may run this spec's Jobs."""
    refused = policy.spec_refusal(spec, job_policy)
    if refused:
        raise policy.PolicyRefusal(refused)
    refused = policy.secret_refusal(spec, kube.get_secret_labels(namespace, spec.secret_name))
    if refused:
        raise policy.SecretRefusal(refused)


def _launch(
    body: Mapping[str, Any], owner: Owner, spec: BackfillSpec, decision: reconcile.Decision, cfg: OperatorConfig
) -> None:
    # kopf.adopt also copies the owner's labels onto children; a GitOps tool's tracking
    # label on the CR would then claim the Jobs, so the owner is passed without labels.
    bare_owner = {
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        "metadata": {"name": owner.name, "namespace": owner.namespace, "uid": owner.uid},
    }
    for item in decision.launch:
        manifest = jobs.build_job(owner, spec, item.window, item.attempt, cfg.defaults)
        kopf.adopt(manifest, owner=cast(kopf.Body, bare_owner))
        try:
            kube.create_job(owner.namespace, manifest)
            metrics.CHUNKS_STARTED.inc()
            if item.attempt > 1:
                metrics.CHUNKS_RETRIED.inc()
        except kube.Conflict:
            log.info("job %s exists already (replayed create); keeping it", manifest["metadata"]["name"])


def reconcile_backfill(namespace: str, name: str, cfg: OperatorConfig, auditlog: AuditLog) -> Outcome:
    body = kube.get_backfill(namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return Outcome(None, (), body)
    now = _now()
    previous: dict[str, Any] = dict(body.get("status") or {})
    generation = body["metadata"].get("generation")
    try:
        spec = parse_spec(body.get("spec") or {})
        windows = spec.windows()
        enforce_policy(namespace, spec, cfg.policy)
    except SpecError as exc:
        new = status.invalid_spec_status(str(exc), generation, previous, now)
        patch = status.changed(previous, new)
        if patch:
            kube.patch_backfill_status(namespace, name, patch)
        recheck = SECRET_RECHECK_SECONDS if isinstance(exc, policy.SecretRefusal) else None
        return Outcome(recheck, (Event("Warning", "InvalidSpec", str(exc)),) if patch else (), body, "Failed")

    owner = owner_of(body)
    state = reconcile.state_from_status(previous)
    events: list[Event] = []
    observed_token = previous.get("retryFailedObserved")
    if spec.retry_failed and spec.retry_failed != observed_token and "retryFailedObserved" in previous:
        if state.failed:
            events.append(
                Event(
                    "Normal",
                    "RetryFailed",
                    f"retryFailed={spec.retry_failed}: re-running {len(state.failed)} failed chunk(s)",
                )
            )
        state = reconcile.reset_failed(state)

    views = [v for j in kube.list_jobs(namespace, jobs.selector(owner)) if (v := jobs.job_view(j))]
    views = _enrich(views, owner, state, auditlog)
    not_started = not state.attempts and not state.succeeded and not views
    blocked_by = None
    if not_started and not spec.suspend:
        blocked_by = reconcile.blocking_peer(
            name, body["metadata"].get("creationTimestamp") or "", spec, _peers(namespace)
        )
    decision = reconcile.decide(spec, windows, state, views, now, blocked_by=blocked_by)
    events += decision.events

    for job_name in decision.delete:
        kube.delete_job(namespace, job_name)
    _launch(body, owner, spec, decision, cfg)

    new = status.summarise(
        windows=windows,
        state=decision.state,
        phase=decision.phase,
        running=decision.running | {launch.window.index for launch in decision.launch},
        parallelism=spec.parallelism,
        generation=generation,
        previous=previous,
        now=now,
        blocked_by=decision.blocked_by,
    )
    new["retryFailedObserved"] = spec.retry_failed or ""
    new["audit"] = _audit(previous.get("audit") or {}, owner, spec, decision.phase, new, auditlog)
    events += _phase_events(previous.get("phase"), decision.phase, new)
    patch = status.changed(previous, new)
    if patch:
        kube.patch_backfill_status(namespace, name, patch)
    _observe(previous, new, decision)
    wake = _next_wake(decision, new)
    if _audit_pending(new):
        # The audit database was unreachable: come back soon, even if the backfill is done.
        wake = AUDIT_RETRY_SECONDS if wake is None else min(wake, AUDIT_RETRY_SECONDS)
    return Outcome(wake, tuple(events), body, decision.phase)


def _audit_pending(new: Mapping[str, Any]) -> bool:
    record = new.get("audit") or {}
    terminal = {"Succeeded": "completed", "Failed": "failed"}.get(str(new.get("phase")))
    not_started = bool(new.get("startTime")) and not record.get("started")
    return not_started or (terminal is not None and record.get("closed") != terminal)


def _audit(
    prior: Mapping[str, Any], owner: Owner, spec: BackfillSpec, phase: str, new: Mapping[str, Any], auditlog: AuditLog
) -> dict[str, Any]:
    """Audit writes that have not landed are retried on every pass until they do."""
    record: dict[str, Any] = {
        "executionId": str(jobs.backfill_execution_id(owner)),
        "started": bool(prior.get("started")),
        "closed": prior.get("closed"),
    }
    began = bool(new.get("startTime"))
    terminal = {"Succeeded": "completed", "Failed": "failed"}.get(phase)
    # Not yet written, or reopened by retryFailed after the row was closed.
    reopen = not record["started"] or (record["closed"] and not terminal)
    if began and reopen and auditlog.start(owner, spec):
        record.update(started=True, closed=None)
    if terminal and record["started"] and record["closed"] != terminal:
        seconds = _elapsed(new.get("startTime"), new.get("completionTime"))
        message = (new.get("conditions") or [{}])[0].get("message") if terminal == "failed" else None
        if auditlog.finish(owner, terminal, seconds, message):
            record["closed"] = terminal
    return record


def _elapsed(start: Any, end: Any) -> float | None:
    if not start or not end:
        return None
    a = datetime.fromisoformat(str(start).replace("Z", "+00:00"))
    b = datetime.fromisoformat(str(end).replace("Z", "+00:00"))
    return (b - a).total_seconds()


def _phase_events(before: Any, after: str, new: Mapping[str, Any]) -> list[Event]:
    if before == after:
        return []
    progress = new.get("progress")
    messages = {
        "Queued": Event("Normal", "Queued", f"waiting for overlapping backfill {new.get('queuedBehind')}"),
        "Suspended": Event("Normal", "Suspended", f"suspended at {progress}; running Jobs deleted"),
        "Succeeded": Event(
            "Normal",
            "Succeeded",
            f"all {progress} chunk(s) succeeded, {new.get('recordsProcessed')} record(s)",
        ),
        "Failed": Event(
            "Warning",
            "Failed",
            f"backfill failed at {progress}: {(new.get('conditions') or [{}])[0].get('message')}",
        ),
    }
    if after in messages:
        return [messages[after]]
    if before == "Suspended" and after in ("Running", "Pending"):
        return [Event("Normal", "Resumed", f"resumed at {progress}")]
    return []


def _next_wake(decision: reconcile.Decision, new: Mapping[str, Any]) -> float | None:
    if decision.phase == "Succeeded":
        return None
    if decision.wake_after is not None:
        return max(0.0, decision.wake_after)
    return IDLE_SECONDS


def _observe(previous: Mapping[str, Any], new: Mapping[str, Any], decision: reconcile.Decision) -> None:
    before = reconcile.state_from_status(previous)
    after = decision.state
    newly = len(after.succeeded - before.succeeded)
    if newly:
        metrics.CHUNKS_SUCCEEDED.inc(newly)
        metrics.RECORDS_PROCESSED.inc(max(0, after.records - before.records))
        if after.duration_count > before.duration_count:
            per = (after.duration_total - before.duration_total) / (after.duration_count - before.duration_count)
            for _ in range(after.duration_count - before.duration_count):
                metrics.CHUNK_DURATION.observe(per)
    failed_now = len(after.failed - before.failed)
    if failed_now:
        metrics.CHUNKS_FAILED.inc(failed_now)


# ----------------------------------------------------------------------------- delete


def finalize_backfill(body: Mapping[str, Any], auditlog: AuditLog) -> bool:
    """Delete the backfill's Jobs and close its audit row as cancelled.

    Returns False when the audit row could not be written (the caller decides whether to
    retry or let go, so a dead database never wedges the finalizer).
    """
    owner = owner_of(body)
    for job in kube.list_jobs(owner.namespace, jobs.selector(owner)):
        kube.delete_job(owner.namespace, job["metadata"]["name"])
    previous = body.get("status") or {}
    record = previous.get("audit") or {}
    if previous.get("phase") in ("Succeeded", "Failed") or not record.get("started"):
        return True
    seconds = _elapsed(previous.get("startTime"), _now().strftime("%Y-%m-%dT%H:%M:%SZ"))
    return auditlog.finish(owner, "cancelled", seconds, "the DbtBackfill was deleted before it finished")
