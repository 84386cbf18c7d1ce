"""One reconcile pass for one DbtBackfill: read, decide (pure), act, record.

The I/O shell around :func:`dbtbackfill.operator.reconcile.decide`: it reads the CR and its Jobs,
asks the pure core what to do, creates/deletes Jobs, writes the audit log and patches
``.status`` once, with only what changed.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from functools import cache
from typing import TYPE_CHECKING, Any, Final, cast

import kopf

from dbtbackfill.core import cost
from dbtbackfill.core.cost import CellEstimate, History
from dbtbackfill.core.planner import Window
from dbtbackfill.core.spec import BackfillSpec, SpecError, parse_spec, parse_tenant_list, tenant_list_hash
from dbtbackfill.operator import (
    jobs,
    kube,
    metrics,
    pod_start,
    policy,
    queue_gate,
    queue_status,
    reconcile,
    status,
    worker_pools,
)
from dbtbackfill.operator.jobs import JobDefaults, Owner
from dbtbackfill.operator.policy import JobPolicy
from dbtbackfill.operator.queue_admission import Member, Verdict
from dbtbackfill.operator.reconcile import ChunkState, Event, JobView

if TYPE_CHECKING:
    from dbtbackfill.core.audit import ExecutionStart

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
    pools: worker_pools.PoolSizes
    unsettled_kept: int = jobs.DEFAULT_UNSETTLED_KEPT

    @classmethod
    def from_env(cls) -> OperatorConfig:
        """Raises :class:`policy.PolicyConfigError` on a malformed policy setting and
        :class:`worker_pools.WorkersConfigError` on a malformed worker count (and
        :class:`jobs.SettleConfigError` on a malformed count of unsettled Jobs)."""
        defaults = JobDefaults(
            image=os.environ.get("DBT_BACKFILL_DEFAULT_IMAGE", "dbt-backfill-operator:0.1.0"),
            service_account_name=os.environ.get("DBT_BACKFILL_JOB_SERVICE_ACCOUNT", "dbt-backfill-job"),
            audit_secret_name=os.environ.get("DBT_BACKFILL_AUDIT_SECRET") or None,
            audit_secret_key=os.environ.get("DBT_BACKFILL_AUDIT_SECRET_KEY") or "DATABASE_URL",
        )
        job_policy = policy.build_policy(
            defaults.image,
            defaults.service_account_name,
            os.environ.get(policy.ALLOWED_IMAGES_ENV),
            os.environ.get(policy.ALLOWED_SERVICE_ACCOUNTS_ENV),
        )
        workers = worker_pools.parse_workers(os.environ.get(worker_pools.WORKERS_ENV))
        kept = jobs.parse_unsettled_kept(os.environ.get(jobs.UNSETTLED_KEPT_ENV))
        url = os.environ.get("DATABASE_URL") or None
        return cls(defaults, url, job_policy, worker_pools.pool_sizes(workers), kept)


@dataclass(frozen=True)
class Outcome:
    """What the daemon needs after a pass: when to look again, and what to tell the user."""

    wake_after: float | None  # None: nothing more to do until something changes
    events: tuple[Event, ...]
    body: Mapping[str, Any] | None
    phase: str | None = None
    api_failed: bool = False  # an API call failed; the daemon backs off
    wake: tuple[str, ...] = ()  # uids of other backfills to wake (their queue granted them slots)
    # The backfill's resourceVersion as this pass last read or wrote it: while kopf's copy has
    # exactly this version, the next pass may use that copy instead of reading the object.
    resource_version: str | None = None


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


# ----------------------------------------------------------------------------- audit


@dataclass(frozen=True)
class ChunkRow:
    status: str | None
    records: int | None
    error: str | None


def _execution_start(
    owner: Owner,
    spec: BackfillSpec,
    execution_id: uuid.UUID,
    start: date,
    end: date,
    *,
    parent_id: uuid.UUID | None = None,
    chunk_index: int | None = None,
    attempt: int | None = None,
    tenant_id: str | None = None,
) -> ExecutionStart:
    """The audit row of the backfill (no parent) or of one chunk attempt of it. A chunk row
    carries its cell's tenant; a matrix backfill's own row has none (it spans its tenants)."""
    from dbtbackfill.core import audit

    return audit.ExecutionStart(
        id=execution_id,
        kind="chunk" if parent_id else "backfill",
        parent_id=parent_id,
        start_date=start,
        end_date=end,
        tenant_id=tenant_id if parent_id else spec.tenant_id,
        models=spec.models,
        backfill_name=owner.name,
        backfill_namespace=owner.namespace,
        backfill_uid=owner.uid,
        chunk_index=chunk_index,
        attempt=attempt,
    )


class _AuditDatabase:
    """The audit database (None: no audit log), reached through one pooled engine."""

    def __init__(self, database_url: str | None, pool_size: int = 5, max_overflow: int = 10) -> None:
        self.url = database_url
        self.pool_size = pool_size
        self.max_overflow = max_overflow

    def _engine(self) -> Any:
        from dbtbackfill.core import audit

        assert self.url is not None
        engine = audit.engine_for(
            self.url, connect_timeout=AUDIT_CONNECT_TIMEOUT, pool_size=self.pool_size, max_overflow=self.max_overflow
        )
        audit.ensure_schema(engine)
        return engine


class _AuditReads(_AuditDatabase):
    """What the operator reads back from the audit log. None (or no rows) when it cannot be read:
    the database being down never stops a backfill."""

    def chunk_rows(self, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, ChunkRow] | None:
        """Chunk rows by id; None when the database cannot be read (so nothing is concluded)."""
        if not self.url or not ids:
            return {}
        import sqlalchemy as sa

        from dbtbackfill.core.audit import BackfillExecution as Row

        try:
            with self._engine().connect() as conn:
                query = sa.select(Row.id, Row.status, Row.records_processed, Row.error_message).where(Row.id.in_(ids))
                return {r.id: ChunkRow(r.status, r.records_processed, r.error_message) for r in conn.execute(query)}
        except Exception as exc:  # the database being down must not stop the backfill
            metrics.AUDIT_WRITE_FAILURES.inc()
            log.warning("audit: cannot read chunk rows (will use Job conditions): %s", exc)
            return None

    def durations(self, models: Sequence[str]) -> History | None:
        """Past completed chunks of exactly ``models``; None when the database cannot be read."""
        if not self.url:
            return None
        from dbtbackfill.core import audit

        try:
            return History(*audit.chunk_durations(self._engine(), models))
        except Exception as exc:  # an estimate is never worth failing a pass for
            log.warning("audit: cannot read past chunk durations for the dry run's estimate: %s", exc)
            return None

    def estimates(self, owner: Owner) -> tuple[int, int, CellEstimate | None] | None:
        """(cells, total rows, largest cell) the backfill's dry-run chunks recorded; None when
        the database cannot be read."""
        if not self.url:
            return None
        from dbtbackfill.core import audit

        try:
            return audit.dry_run_estimates(self._engine(), jobs.backfill_execution_id(owner))
        except Exception as exc:  # an estimate is never worth failing a pass for
            log.warning("audit: cannot read the dry-run chunks' estimates: %s", exc)
            return None


class AuditLog(_AuditReads):
    """The operator's side of ``backfill_executions``. Every write is an idempotent upsert
    keyed by a UUIDv5 of the backfill, so retrying until it lands never duplicates."""

    def start(self, owner: Owner, spec: BackfillSpec) -> bool:
        if not self.url:
            return True
        from dbtbackfill.core import audit

        try:
            audit.record_start(
                self._engine(),
                _execution_start(owner, spec, jobs.backfill_execution_id(owner), spec.start_date, spec.end_date),
            )
            return True
        except Exception as exc:
            metrics.AUDIT_WRITE_FAILURES.inc()
            log.warning("audit: start of %s/%s not written yet, will retry: %s", owner.namespace, owner.name, exc)
            return False

    def unstarted(self, owner: Owner, spec: BackfillSpec, window: Window, attempt: int, message: str) -> None:
        """The chunk row of an attempt whose Pod never started (its runner never ran)."""
        if not self.url:
            return
        from dbtbackfill.core import audit

        chunk = window.index
        execution_id = jobs.chunk_execution_id(owner, chunk, attempt)
        try:
            engine = self._engine()
            audit.record_start(
                engine,
                _execution_start(
                    owner,
                    spec,
                    execution_id,
                    window.start,
                    window.end,
                    parent_id=jobs.backfill_execution_id(owner),
                    chunk_index=chunk,
                    attempt=attempt,
                    tenant_id=jobs.tenant_of(spec, window),
                ),
            )
            audit.record_finish(
                engine, execution_id, "failed", duration_seconds=0.0, records_processed=None, error_message=message
            )
        except Exception as exc:  # best effort: the status and the Event carry the reason too
            metrics.AUDIT_WRITE_FAILURES.inc()
            log.warning("audit: chunk %d attempt %d row not written: %s", chunk, attempt, exc)

    def finish(self, owner: Owner, outcome: str, seconds: float | None, message: str | None) -> bool:
        if not self.url:
            return True
        from dbtbackfill.core import audit

        parent = jobs.backfill_execution_id(owner)
        try:
            engine = self._engine()
            audit.record_finish(
                engine,
                parent,
                outcome,  # type: ignore[arg-type]
                duration_seconds=seconds,
                records_processed=audit.completed_records(engine, parent),
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


@dataclass(frozen=True)
class Observed:
    """The backfill's Jobs as the reconciler sees them, and chunks it must not launch yet."""

    views: list[JobView]
    busy: frozenset[int]
    audit_unreadable: bool = False


@cache
def _side_reads(workers: int) -> ThreadPoolExecutor:
    """Threads for the read a pass makes beside its own (Jobs and Pods are listed at once)."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pass-read")


def _observe_cluster(owner: Owner, spec: BackfillSpec, now: datetime, workers: int = 1) -> Observed:
    """Jobs, plus what their Pods (and the Job controller's Events) say about starting and living.

    Only Jobs whose end no status records yet (not settled) and only Pods that have not
    finished are listed, so a pass costs the same however many finished Jobs are kept."""
    pod_list = _side_reads(workers).submit(kube.list_live_pods, owner.namespace, jobs.selector(owner))
    try:
        listed = kube.list_jobs(owner.namespace, jobs.unsettled_selector(owner))
    finally:
        live_pods = pod_list.result()
    views = [v for j in listed if (v := jobs.job_view(j))]
    pods: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for pod in live_pods:
        position = jobs.chunk_of((pod.get("metadata") or {}).get("labels") or {})
        if position is not None:
            pods.setdefault(position, []).append(pod)
    out = []
    for view in views:
        mine = pods.get((view.chunk, view.attempt), [])
        events: list[dict[str, Any]] = []
        overdue = view.created is not None and (now - view.created).total_seconds() >= spec.start_deadline_seconds
        if view.phase == "active" and not mine and overdue:
            # No live Pod: its Pod may have finished before the Job controller marked the Job
            # (then it started), or never been made (did the controller say why?).
            mine = kube.list_pods(owner.namespace, jobs.chunk_selector(owner, view.chunk, view.attempt))
            if not mine:
                events = kube.list_job_events(owner.namespace, view.name)
        seen = pod_start.report(mine, events)
        out.append(replace(view, pod_started=seen.started, start_problem=seen.problem, alive=view.alive or seen.alive))
    # Pods outlive a Job deleted in the background (kubectl's default): they still hold their chunk.
    busy = frozenset(c for (c, _), group in pods.items() if pod_start.report(group).alive)
    return Observed(out, busy)


def _with_audit(
    observed: Observed, owner: Owner, spec: BackfillSpec, cells: Sequence[Window], state: ChunkState, auditlog: AuditLog
) -> Observed:
    """Records and dbt's error text come from the chunks' audit rows, and so does the end of an
    attempt whose Job vanished unseen (a TTL while the operator was down): without a readable
    row such a chunk is held, never relaunched blind."""
    views = observed.views
    lost = reconcile.vanished(state, views) if auditlog.url else []
    finished = [(v.chunk, v.attempt) for v in views if v.phase != "active" and v.chunk not in state.succeeded]
    wanted = [jobs.chunk_execution_id(owner, c, a) for c, a in [*finished, *lost]]
    rows = auditlog.chunk_rows(wanted)
    if rows is None:
        return Observed(views, observed.busy | {c for c, _ in lost}, audit_unreadable=True)
    out = []
    for v in views:
        row = rows.get(jobs.chunk_execution_id(owner, v.chunk, v.attempt))
        out.append(replace(v, records=row.records, message=row.error or v.message) if row else v)
    for c, a in lost:
        row = rows.get(jobs.chunk_execution_id(owner, c, a)) or ChunkRow(None, None, None)
        name = jobs.cell_job_name(owner, spec, cells[c], a) if c < len(cells) else jobs.job_name(owner, c, a)
        out.append(reconcile.view_from_audit(c, a, row.status, row.records, row.error, name))
    return Observed(out, observed.busy)


class TenantListUnavailable(Exception):
    """spec.tenantIdsFrom names a ConfigMap or key that is not there (yet): retried."""


def resolve_tenants(namespace: str, spec: BackfillSpec, previous: Mapping[str, Any]) -> tuple[str | None, ...]:
    """The tenants of the plan. A tenantIdsFrom list is read from its ConfigMap until a valid
    one is snapshotted into ``status.tenants``, then always taken from there: cell numbers, Job
    names and audit ids depend on it, and a rewrite of fact tables must not change tenants
    halfway. Raises :class:`SpecError` for an invalid list."""
    listed = spec.tenants()
    if listed is not None:
        return listed
    assert spec.tenant_ids_from is not None
    snapshot = reconcile.snapshot_ids(previous)
    if snapshot is not None:
        return snapshot
    source = spec.tenant_ids_from
    data = kube.get_configmap_data(namespace, source.name)
    if data is None:
        raise TenantListUnavailable(f"spec.tenantIdsFrom: ConfigMap {source.name} not found in namespace {namespace}")
    if source.key not in data:
        raise TenantListUnavailable(f"spec.tenantIdsFrom: ConfigMap {source.name} has no key {source.key}")
    return parse_tenant_list(data[source.key], source)


def tenants_status(spec: BackfillSpec, tenants: Sequence[str | None]) -> dict[str, Any] | None:
    """``status.tenants``: the matrix's tenant count and list hash, and for a tenantIdsFrom
    list the snapshot itself, taken the first time the list is read and valid."""
    if not jobs.is_matrix(spec):
        return None
    ids = [t or "" for t in tenants]
    source = spec.tenant_ids_from.describe() if spec.tenant_ids_from else "spec.tenantIds"
    out: dict[str, Any] = {"count": len(ids), "hash": tenant_list_hash(ids), "source": source}
    if spec.tenant_ids_from is not None:
        out["ids"] = ids
    return out


def _peers(namespace: str) -> list[reconcile.Peer]:
    return [peer for item in kube.list_backfills(namespace) if (peer := reconcile.peer_of(item))]


def enforce_policy(spec: BackfillSpec, job_policy: JobPolicy) -> None:
    """Raise :class:`policy.PolicyRefusal` unless the operator may run this spec's Jobs' image
    and ServiceAccount (pure: checked on every pass)."""
    refused = policy.spec_refusal(spec, job_policy)
    if refused:
        raise policy.PolicyRefusal(refused)


def enforce_secret(namespace: str, spec: BackfillSpec) -> None:
    """Raise :class:`policy.SecretRefusal` unless the Secret the Jobs would read carries the
    opt-in label. Read just before Jobs are created (the only moment it grants anything), so
    a pass that only records finished Jobs costs no Secret read."""
    refused = policy.secret_refusal(spec, kube.get_secret_labels(namespace, spec.secret_name))
    if refused:
        raise policy.SecretRefusal(refused)


# The resourceVersion of the backfill as the running pass (one thread) last read or wrote it.
_pass_version = threading.local()


def _write_status(namespace: str, name: str, patch: Mapping[str, Any]) -> None:
    _pass_version.value = kube.patch_backfill_status(namespace, name, patch) or None


def _version_of(body: Mapping[str, Any] | None) -> str | None:
    version = ((body or {}).get("metadata") or {}).get("resourceVersion")
    return str(version) if version else None


def _current_body(
    namespace: str, name: str, cached: Mapping[str, Any] | None, known_version: str | None
) -> Mapping[str, Any] | None:
    """The backfill to act on: kopf's copy when it is the version the last pass ended with
    (kopf has seen that pass's own status write, and nothing newer arrived since), else read
    now. A copy of any other version may predate our own last write: acting on it could
    relaunch a chunk that write recorded."""
    if cached is not None and known_version is not None and _version_of(cached) == known_version:
        return cached
    return kube.get_backfill(namespace, name)


def _launch(
    body: Mapping[str, Any], owner: Owner, spec: BackfillSpec, decision: reconcile.Decision, cfg: OperatorConfig
) -> tuple[tuple[reconcile.Launch, ...], kube.ApiFailure | None]:
    """Create the decided Jobs; stop at the first failure. Returns what was not created, and why."""
    # kopf.adopt also copies the owner's labels onto children; a GitOps tool's tracking
    # label on the CR would then claim the Jobs, so the owner is passed without labels.
    bare_owner = {
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        "metadata": {"name": owner.name, "namespace": owner.namespace, "uid": owner.uid},
    }
    for done, item in enumerate(decision.launch):
        manifest = jobs.build_job(owner, spec, item.window, item.attempt, cfg.defaults)
        kopf.adopt(manifest, owner=cast(kopf.Body, bare_owner))
        try:
            kube.create_job(owner.namespace, manifest)
            metrics.CHUNKS_STARTED.inc()
            if item.attempt > 1:
                metrics.CHUNKS_RETRIED.inc()
        except kube.Conflict:
            log.info("job %s exists already (replayed create); keeping it", manifest["metadata"]["name"])
        except kube.ApiFailure as exc:
            # The rest would most likely fail alike (quota, RBAC, admission): try again later.
            return decision.launch[done:], exc
    return (), None


def _unlaunch(decision: reconcile.Decision, failed: Sequence[reconcile.Launch], now: datetime) -> reconcile.Decision:
    """Forget launches whose Job was never created. The chunk stays due (the API error is not
    its fault: nothing is charged to its retry budget) and relaunches under the same attempt."""
    attempts = dict(decision.state.attempts)
    retry_at = dict(decision.state.retry_at)
    for item in failed:
        c = item.window.index
        if item.attempt > 1:
            attempts[c] = item.attempt - 1
            retry_at[c] = now  # due, so not mistaken for an attempt whose Job vanished
        else:
            attempts.pop(c, None)
    kept = tuple(item for item in decision.launch if item not in failed)
    return replace(decision, state=replace(decision.state, attempts=attempts, retry_at=retry_at), launch=kept)


@dataclass(frozen=True)
class Queued:
    verdict: Verdict
    view: queue_gate.View
    me: Member


def _admitted(
    owner: Owner,
    body: Mapping[str, Any],
    spec: BackfillSpec,
    decision: reconcile.Decision,
    views: Sequence[JobView],
    now: datetime,
) -> tuple[reconcile.Decision, Queued | None]:
    """Ask the backfill's queue what it may start (call under the queue's lock)."""
    if not spec.queue_name:
        return decision, None
    created = body["metadata"].get("creationTimestamp") or ""
    verdict, view, me = queue_gate.admit(
        owner.namespace, owner, created, spec.priority, spec.queue_name, views, len(decision.launch), now
    )
    return admitted_decision(decision, verdict, now), Queued(verdict, view, me)


def admitted_decision(decision: reconcile.Decision, verdict: Verdict, now: datetime) -> reconcile.Decision:
    """``decision`` with only the launches ``verdict`` grants, and the phase and wake-up to match.

    A launch the queue refuses is forgotten like one whose create failed: uncharged, due again.
    A backfill that has not started and may start nothing is Queued."""
    refused = decision.launch[verdict.granted :]
    if refused:
        decision = _unlaunch(decision, refused, now)
    never_started = not decision.state.attempts and not decision.state.succeeded and not decision.running
    if never_started and not decision.launch and decision.phase in ("Running", "Pending") and verdict.waiting:
        events = tuple(e for e in decision.events if e.reason != "Started")
        decision = replace(decision, phase="Queued", events=events)
    if verdict.wake_after is not None:
        wake = verdict.wake_after if decision.wake_after is None else min(decision.wake_after, verdict.wake_after)
        decision = replace(decision, wake_after=wake)
    return decision


def _failure_of(exc: kube.ApiFailure) -> tuple[str, str]:
    return status.api_failure_reason(exc.verb, exc.resource), exc.message


def _report_failure(
    namespace: str, name: str, body: Mapping[str, Any], previous: Mapping[str, Any], exc: kube.ApiFailure, now: datetime
) -> Outcome:
    """A call the pass cannot do without failed: say so on the backfill (condition + Event),
    change nothing else, and come back after the backoff."""
    failures = int(previous.get("apiFailures") or 0) + 1
    delay = reconcile.api_backoff(failures)
    reason, message = _failure_of(exc)
    new = status.with_api_failure(
        previous,
        previous,
        (reason, message),
        failures=failures,
        retry_at=now + timedelta(seconds=delay),
        generation=body["metadata"].get("generation"),
        now=now,
    )
    patch = status.changed(previous, new)
    if patch:
        _write_status(namespace, name, patch)  # if this fails too, the daemon reports it
    log.warning("reconcile of %s/%s: %s; retrying in %.0fs", namespace, name, exc, delay)
    return Outcome(delay, (Event("Warning", reason, message),), body, previous.get("phase"), api_failed=True)


def reconcile_backfill(
    namespace: str,
    name: str,
    cfg: OperatorConfig,
    auditlog: AuditLog,
    cached: Mapping[str, Any] | None = None,
    known_version: str | None = None,
) -> Outcome:
    """One pass. ``cached`` is kopf's copy of the backfill, used instead of a read when its
    resourceVersion is ``known_version`` (the previous pass's ``Outcome.resource_version``)."""
    body = _current_body(namespace, name, cached, known_version)
    _pass_version.value = _version_of(body)
    outcome = _reconcile(namespace, name, cfg, auditlog, body)
    return replace(outcome, resource_version=_pass_version.value)


def _refused(
    namespace: str,
    name: str,
    body: Mapping[str, Any],
    previous: Mapping[str, Any],
    spec: BackfillSpec | None,
    exc: SpecError,
    now: datetime,
) -> Outcome:
    """A spec that cannot run (as written, or by policy): InvalidSpec, no Job created."""
    new = status.invalid_spec_status(str(exc), body["metadata"].get("generation"), previous, now)
    patch = status.changed(previous, new)
    if patch:
        _write_status(namespace, name, patch)
    # Fixable without touching the backfill: a Secret's label, a ConfigMap's tenant list.
    fixable = isinstance(exc, policy.SecretRefusal) or (spec is not None and spec.tenant_ids_from is not None)
    recheck = SECRET_RECHECK_SECONDS if fixable else None
    return Outcome(recheck, (Event("Warning", "InvalidSpec", str(exc)),) if patch else (), body, "Failed")


def _reconcile(
    namespace: str, name: str, cfg: OperatorConfig, auditlog: AuditLog, body: Mapping[str, Any] | None
) -> Outcome:
    if body is None or body["metadata"].get("deletionTimestamp"):
        return Outcome(None, (), body)
    now = _now()
    previous: dict[str, Any] = dict(body.get("status") or {})
    generation = body["metadata"].get("generation")
    spec: BackfillSpec | None = None
    try:
        spec = parse_spec(body.get("spec") or {})
        enforce_policy(spec, cfg.policy)
        tenants = resolve_tenants(namespace, spec, previous)
        windows: Sequence[Window] = spec.cells(tenants)
    except SpecError as exc:
        return _refused(namespace, name, body, previous, spec, exc, now)
    except TenantListUnavailable as exc:
        new = status.waiting_status("TenantListUnavailable", str(exc), generation, previous, now)
        patch = status.changed(previous, new)
        if patch:
            _write_status(namespace, name, patch)
        told = (Event("Warning", "TenantListUnavailable", str(exc)),) if patch else ()
        return Outcome(SECRET_RECHECK_SECONDS, told, body, "Pending")
    except kube.ApiFailure as exc:  # the tenant list's ConfigMap
        return _report_failure(namespace, name, body, previous, exc, now)

    if spec.tenant_ids_from is not None and reconcile.snapshot_ids(previous) is None:
        # The snapshot lands before any Job exists: a pass that dies after creating Jobs must
        # find the list those Jobs were numbered by, not whatever the ConfigMap says by then.
        snapshot = {"tenants": tenants_status(spec, tenants)}
        try:
            _write_status(namespace, name, snapshot)
        except kube.ApiFailure as exc:
            return _report_failure(namespace, name, body, previous, exc, now)
        previous.update(snapshot)

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

    try:
        cluster = _observe_cluster(owner, spec, now, cfg.pools.reconcile_workers)
        observed = _with_audit(cluster, owner, spec, windows, state, auditlog)
        not_started = not state.attempts and not state.succeeded and not observed.views
        blocked_by = None
        if not_started and not spec.suspend:
            blocked_by = reconcile.blocking_peer(
                name, body["metadata"].get("creationTimestamp") or "", spec, _peers(namespace), tenants
            )
    except kube.ApiFailure as exc:
        return _report_failure(namespace, name, body, previous, exc, now)
    launch_after = reconcile.parse_time(previous.get("apiRetryAt"))
    decision = reconcile.decide(
        spec, windows, state, observed.views, now, blocked_by=blocked_by, busy=observed.busy, launch_after=launch_after
    )
    events += decision.events
    if decision.launch:
        try:
            enforce_secret(namespace, spec)
        except policy.SecretRefusal as exc:
            return _refused(namespace, name, body, previous, spec, exc, now)
        except kube.ApiFailure as exc:
            return _report_failure(namespace, name, body, previous, exc, now)

    failure: kube.ApiFailure | None = None
    # A queued backfill admits and creates its Jobs under its queue's lock (see queue_gate).
    with queue_gate.hold(namespace, spec.queue_name):
        try:
            decision, queued = _admitted(owner, body, spec, decision, observed.views, now)
        except kube.ApiFailure as exc:
            return _report_failure(namespace, name, body, previous, exc, now)
        not_created, failure = _launch(body, owner, spec, decision, cfg)
        if not_created:
            decision = _unlaunch(decision, not_created, now)
        if queued is not None:
            queue_gate.publish_pass(namespace, queued.me, queued.view, queued.verdict, now)

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
        matrix=jobs.is_matrix(spec),
    )
    tenant_block = tenants_status(spec, tenants)
    if tenant_block is not None:
        new["tenants"] = tenant_block
    if spec.dry_run:
        settled = len(decision.state.succeeded) + len(decision.state.failed)
        new["costEstimate"] = _cost_estimate(previous, generation, spec, windows, auditlog, owner, settled)
    new["retryFailedObserved"] = spec.retry_failed or ""
    if queued is not None:
        new = queue_status.with_queue(new, queued.verdict, spec.priority, previous, generation, now)
        events += queue_status.queue_events(previous, queued.verdict)
    elif previous.get("queue"):
        new["queue"] = None  # left its queue
    new["audit"] = _audit(previous.get("audit") or {}, owner, spec, decision.phase, new, auditlog)
    events += _phase_events(previous.get("phase"), decision.phase, new)
    # Deleting comes after the status records why (suspend, a never-started Pod), so an operator
    # killed in between finds the reason written, not a Job that vanished unexplained.
    new_failure = _patched_status(namespace, name, previous, new, failure, generation, now, events)
    if new_failure is failure and not observed.audit_unreadable:  # the status landed
        listed = {v.name for v in cluster.views}
        recorded = [n for n in reconcile.settled(decision.state, observed.views, len(windows)) if n in listed]
        _settle(namespace, reconcile.to_label(recorded, cfg.unsettled_kept))
    for chunk, attempt, message in decision.unstarted:
        auditlog.unstarted(owner, spec, windows[chunk], attempt, message)
    for job_name in decision.delete:
        try:
            kube.delete_job(namespace, job_name)
        except kube.ApiFailure as exc:
            if new_failure is None:  # the Job stays; the next pass deletes it again
                written = dict(new)
                new_failure = _patched_status(namespace, name, written, dict(new), exc, generation, now, events)
                new_failure = new_failure or exc
            break
    _observe(previous, new, decision)
    wake = _next_wake(decision, new)
    if decision.launch:
        # The Jobs created now are looked at again by their start deadline: their creation and
        # their Pod being scheduled do not wake the backfill (handlers.on_job_event).
        deadline = float(spec.start_deadline_seconds)
        wake = deadline if wake is None else min(wake, deadline)
    if _audit_pending(new) or observed.audit_unreadable:
        # The audit database was unreachable: come back soon, even if the backfill is done.
        wake = AUDIT_RETRY_SECONDS if wake is None else min(wake, AUDIT_RETRY_SECONDS)
    if new_failure is not None:
        backoff = reconcile.api_backoff(int(previous.get("apiFailures") or 0) + 1)
        wake = backoff if wake is None else min(max(wake, 1.0), backoff)
    others = queued.verdict.wake if queued else ()
    return Outcome(wake, tuple(events), body, decision.phase, api_failed=new_failure is not None, wake=others)


def _patched_status(
    namespace: str,
    name: str,
    previous: Mapping[str, Any],
    new: dict[str, Any],
    failure: kube.ApiFailure | None,
    generation: int | None,
    now: datetime,
    events: list[Event],
) -> kube.ApiFailure | None:
    """Write the pass's status with the ReconcileFailure condition; returns the failure to back off on."""
    failures = int(previous.get("apiFailures") or 0) + 1 if failure else 0
    problem = _failure_of(failure) if failure else None
    retry_at = now + timedelta(seconds=reconcile.api_backoff(failures)) if failure else None
    if problem:
        events.append(Event("Warning", *problem))
    full = status.with_api_failure(
        new, previous, problem, failures=failures, retry_at=retry_at, generation=generation, now=now
    )
    new.clear()
    new.update(full)
    patch = status.changed(previous, new)
    if patch:
        try:
            _write_status(namespace, name, patch)
        except kube.ApiFailure as exc:
            events.append(Event("Warning", *_failure_of(exc)))
            return exc
    return failure


def _settle(namespace: str, names: Sequence[str]) -> None:
    """Label Jobs whose end the status now records. Best effort: a Job not labelled (the API
    failed, the operator died first) is listed by the next pass and labelled then."""
    for job_name in names:
        try:
            kube.label_job(namespace, job_name, jobs.SETTLED)
        except kube.ApiFailure as exc:
            log.warning("job %s/%s not labelled settled yet: %s", namespace, job_name, exc)
            return


def _cost_estimate(
    previous: Mapping[str, Any],
    generation: int | None,
    spec: BackfillSpec,
    cells: Sequence[Window],
    auditlog: AuditLog,
    owner: Owner,
    settled: int,
) -> dict[str, Any]:
    """A dry run's ETA for the real run: past completed chunks of the same models, per day, over
    this plan's cells and parallelism (read once per generation); and the source rows the
    dry-run chunks estimated and recorded in their audit rows (total, the largest cell), read
    again whenever more cells have ``settled`` (finished) since the last read."""
    prior = previous.get("costEstimate") or {}
    same = prior.get("observedGeneration") == generation
    if same and prior.get("estimatedSeconds") is not None:
        out = dict(prior)  # without past chunks (or a readable audit log) it is looked up again
    else:
        history = auditlog.durations(spec.models)
        days = sum(c.days for c in cells)
        per_day = history.seconds_per_day if history else None
        seconds = None if per_day is None else round(per_day * days / spec.parallelism, 1)
        out = {
            "observedGeneration": generation,
            "cells": len(cells),
            "days": days,
            "estimatedSeconds": seconds,
            "pastChunks": history.chunks if history else 0,
        }
        if same:  # keep the estimates read so far this generation
            out.update({k: prior[k] for k in cost.ESTIMATE_FIELDS if k in prior})
    if not same or prior.get("settledCellsRead") != settled:
        recorded = auditlog.estimates(owner)
        if recorded is not None:
            out.update(cost.estimates_summary(*recorded), settledCellsRead=settled)
    return out


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
    if before == after or (after == "Queued" and not new.get("queuedBehind")):
        return []  # waiting on a DbtBackfillQueue has Events of its own (queue_status.queue_events)
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


@dataclass(frozen=True)
class Finalized:
    alive: int  # Jobs (or Pods of deleted Jobs) still there: some dbt process may still run
    audit_written: bool


def finalize_backfill(body: Mapping[str, Any], auditlog: AuditLog) -> Finalized:
    """Delete the backfill's Jobs; once no Pod of theirs is left, close the audit row as cancelled.

    The caller keeps the finalizer while ``alive`` (so an overlapping backfill cannot start
    while a cancelled chunk still writes its window), and decides whether to retry or let go
    of an audit row that could not be written (a dead database never wedges the finalizer).
    """
    owner = owner_of(body)
    listed = kube.list_jobs(owner.namespace, jobs.selector(owner))
    for job in listed:
        if not (job.get("metadata") or {}).get("deletionTimestamp"):
            kube.delete_job(owner.namespace, job["metadata"]["name"])
    pods = [p for p in kube.list_pods(owner.namespace, jobs.selector(owner)) if pod_start.pod_alive(p)]
    if listed or pods:
        return Finalized(len(listed) or len(pods), False)
    previous = body.get("status") or {}
    record = previous.get("audit") or {}
    if previous.get("phase") in ("Succeeded", "Failed") or not record.get("started"):
        return Finalized(0, True)
    seconds = _elapsed(previous.get("startTime"), _now().strftime("%Y-%m-%dT%H:%M:%SZ"))
    return Finalized(0, auditlog.finish(owner, "cancelled", seconds, "the DbtBackfill was deleted before it finished"))
