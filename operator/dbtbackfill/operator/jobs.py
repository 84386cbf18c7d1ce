"""Names, labels and manifests of the Job that runs one chunk attempt.

Pure: builds plain dicts. Names are deterministic in (backfill, chunk, attempt), so a
replayed create after an operator restart gets 409 from the API instead of a twin Job.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from dbtbackfill.core.planner import Cell, Window
from dbtbackfill.core.spec import BackfillSpec
from dbtbackfill.operator.reconcile import JobPhase, JobView

GROUP: Final = "dbt-backfill.io"
LABEL_BACKFILL: Final = f"{GROUP}/backfill"
LABEL_BACKFILL_UID: Final = f"{GROUP}/backfill-uid"
LABEL_CHUNK: Final = f"{GROUP}/chunk"
LABEL_ATTEMPT: Final = f"{GROUP}/attempt"
LABEL_TENANT: Final = f"{GROUP}/tenant"
LABEL_WINDOW_START: Final = f"{GROUP}/window-start"
LABEL_WINDOW_END: Final = f"{GROUP}/window-end"
# The DbtBackfillQueue that admitted the Job: admission counts a queue's Jobs by this label.
LABEL_QUEUE: Final = f"{GROUP}/queue"
CONTAINER: Final = "dbt"
#: The runner's exit code for a chunk refused for good (the contract check, a microbatch model
#: under a tenant): the Job's podFailurePolicy fails the Job on it with reason
#: ``PodFailurePolicy``, and the operator fails the chunk at once instead of retrying it.
EXIT_REFUSED: Final = 3
REFUSED_REASON: Final = "PodFailurePolicy"
# Set on a finished Job once a status patch has recorded its end: passes and the Job watch
# select without it, so finished Jobs (kept when there is no ttlSecondsAfterFinished) cost
# nothing (Argo Workflows keeps finished Pods out of its informer the same way).
LABEL_SETTLED: Final = f"{GROUP}/settled"
SETTLED: Final = {LABEL_SETTLED: "true"}
# Labelling costs a write per Job, which only pays once a backfill keeps many finished Jobs: a
# pass leaves this many of them unlabelled (and lists them), and labels only the ones beyond.
UNSETTLED_KEPT_ENV: Final = "DBT_BACKFILL_UNSETTLED_JOBS"
DEFAULT_UNSETTLED_KEPT: Final = 50
MAX_UNSETTLED_KEPT: Final = 10_000


class SettleConfigError(ValueError):
    """``DBT_BACKFILL_UNSETTLED_JOBS`` is not a whole number in range."""


def parse_unsettled_kept(text: str | None) -> int:
    """``DBT_BACKFILL_UNSETTLED_JOBS``: finished Jobs per backfill a pass may keep listing
    (0 labels every settled Job at once)."""
    if text is None or not text.strip():
        return DEFAULT_UNSETTLED_KEPT
    try:
        value = int(text.strip())
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_UNSETTLED_KEPT:
        raise SettleConfigError(
            f"{UNSETTLED_KEPT_ENV} must be a whole number from 0 to {MAX_UNSETTLED_KEPT}, got {text!r}"
        )
    return value


MANAGED_BY: Final = {"app.kubernetes.io/managed-by": "dbt-backfill-operator"}
ANNOTATION_TENANT: Final = f"{GROUP}/tenant"
ALL_TENANTS: Final = "all"
# Kubernetes' label value shape (k8s.io/apimachinery/pkg/util/validation), at most 63 characters.
LABEL_VALUE_RE: Final = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
RUNNER_UID: Final = 10001
WORK_DIR: Final = "/tmp"  # noqa: S108  # an emptyDir in the pod, not the image's /tmp
# Audit ids are UUIDv5 in this namespace, so the operator and a restarted operator agree.
AUDIT_NAMESPACE: Final = uuid.UUID("6f0c7e0a-4c53-4cf2-9a53-6a7b6a1c0d11")


@dataclass(frozen=True)
class Owner:
    """The DbtBackfill a Job belongs to."""

    name: str
    namespace: str
    uid: str


def backfill_execution_id(owner: Owner) -> uuid.UUID:
    return uuid.uuid5(AUDIT_NAMESPACE, owner.uid)


def chunk_execution_id(owner: Owner, chunk: int, attempt: int) -> uuid.UUID:
    return uuid.uuid5(AUDIT_NAMESPACE, f"{owner.uid}/{chunk}/{attempt}")


def _label_value(text: str) -> str:
    """Label values hold at most 63 characters and must end alphanumeric."""
    return text[:63].rstrip("-_.")


def tenant_label(tenant_id: str | None) -> str:
    """The tenant as a label value: the tenant id itself whenever it is a valid label value.

    A tenant id may end in '-' or '_' (warehouses allow it, and so do the CLI and the CRD),
    which a label value may not. Such an id becomes a readable prefix, a dot and a hash of
    the whole id. Tenant ids never contain a dot, so the result can equal no real tenant id,
    and the hash keeps two such tenants apart. The exact id is in the Job's annotation.
    """
    if tenant_id is None:
        return ALL_TENANTS
    if len(tenant_id) <= 63 and LABEL_VALUE_RE.fullmatch(tenant_id):
        return tenant_id
    digest = hashlib.sha256(tenant_id.encode()).hexdigest()[:10]
    return f"{tenant_id[:52].rstrip('-_')}.{digest}"


def job_name(owner: Owner, chunk: int, attempt: int) -> str:
    # A short hash of the uid keeps names of a deleted-and-recreated backfill distinct
    # from the old one's Jobs that may still be terminating. The name is a DNS-1123 label
    # (no dots), whatever the backfill's name: it becomes each Pod's job-name label and the
    # prefix of its hostname.
    digest = hashlib.sha256(owner.uid.encode()).hexdigest()[:5]
    prefix = owner.name[:40].replace(".", "-").rstrip("-")
    return f"{prefix}-{digest}-c{chunk}-a{attempt}"


def tenant_of(spec: BackfillSpec, window: Window) -> str | None:
    """The tenant a chunk runs for: its cell's, or the spec's (a plain window of a one-tenant plan)."""
    return window.tenant if isinstance(window, Cell) else spec.tenant_id


def is_matrix(spec: BackfillSpec) -> bool:
    return bool(spec.tenant_ids) or spec.tenant_ids_from is not None


def cell_job_name(owner: Owner, spec: BackfillSpec, window: Window, attempt: int) -> str:
    """A chunk's Job name. In a matrix, a hash of the tenant and the window's own index name the
    cell, so the name says which tenant it is (the same tenant's Jobs share it) and never depends
    on the cell order; a one-tenant plan keeps the plain chunk-index name."""
    if not is_matrix(spec) or not isinstance(window, Cell):
        return job_name(owner, window.index, attempt)
    digest = hashlib.sha256(owner.uid.encode()).hexdigest()[:5]
    tenant = hashlib.sha256((window.tenant or "").encode()).hexdigest()[:6]
    prefix = owner.name[:30].replace(".", "-").rstrip("-")
    return f"{prefix}-{digest}-t{tenant}-w{window.window_index}-a{attempt}"


def selector(owner: Owner) -> str:
    """All of the backfill's Jobs (and their Pods), settled or not."""
    return f"{LABEL_BACKFILL_UID}={owner.uid}"


def unsettled_selector(owner: Owner) -> str:
    """The backfill's Jobs whose end no status records yet: what a pass lists."""
    return f"{selector(owner)},!{LABEL_SETTLED}"


def chunk_selector(owner: Owner, chunk: int, attempt: int) -> str:
    """The Pods of one chunk attempt."""
    return f"{selector(owner)},{LABEL_CHUNK}={chunk},{LABEL_ATTEMPT}={attempt}"


#: The Job watch (server-side): our Jobs, without those already settled.
WATCH_SELECTOR: Final = f"{LABEL_BACKFILL_UID},!{LABEL_SETTLED}"


def job_labels(owner: Owner, spec: BackfillSpec, window: Window, attempt: int) -> dict[str, str]:
    return {
        **MANAGED_BY,
        LABEL_BACKFILL: _label_value(owner.name),
        LABEL_BACKFILL_UID: owner.uid,
        LABEL_CHUNK: str(window.index),
        LABEL_ATTEMPT: str(attempt),
        LABEL_TENANT: tenant_label(tenant_of(spec, window)),
        LABEL_WINDOW_START: window.start.isoformat(),
        LABEL_WINDOW_END: window.end.isoformat(),
        **({LABEL_QUEUE: spec.queue_name} if spec.queue_name else {}),
    }


def job_annotations(spec: BackfillSpec, window: Window) -> dict[str, str]:
    """What labels cannot hold exactly: the window as a range, and the tenant id as given."""
    annotations = {f"{GROUP}/window": window.label()}
    tenant = tenant_of(spec, window)
    if tenant is not None:
        annotations[ANNOTATION_TENANT] = tenant
    return annotations


def runner_command(owner: Owner, spec: BackfillSpec, window: Window, attempt: int) -> list[str]:
    """The exact command a chunk runs: the documented CLI, never a private entry point."""
    argv = [
        "python",
        "-m",
        "scripts.run_dbt_backfill",
        "--start-date",
        window.start.isoformat(),
        "--end-date",
        window.end.isoformat(),
    ]
    tenant = tenant_of(spec, window)
    if tenant:
        argv += ["--tenant-id", tenant]
    if spec.models:
        argv += ["--models", *spec.models]
    if spec.threads:
        argv += ["--threads", str(spec.threads)]
    if spec.dry_run:
        argv.append("--dry-run")
    if spec.allow_recent:
        argv.append("--allow-recent")
    if spec.verify:
        argv.append("--verify")
    if spec.allow_full_rebuild:
        argv.append("--allow-full-rebuild")
    if spec.allow_cross_window:
        argv.append("--allow-cross-window")
    argv += [
        "--execution-id",
        str(chunk_execution_id(owner, window.index, attempt)),
        "--parent-id",
        str(backfill_execution_id(owner)),
        "--chunk-index",
        str(window.index),
        "--attempt",
        str(attempt),
        "--backfill-name",
        owner.name,
        "--backfill-namespace",
        owner.namespace,
        "--backfill-uid",
        owner.uid,
    ]
    return argv


@dataclass(frozen=True)
class JobDefaults:
    """Operator-level configuration that a spec may override."""

    image: str
    service_account_name: str = "dbt-backfill-job"
    # A Secret (in each backfill namespace) with the operator's audit-database URL, when that
    # is not the warehouse: chunks then write their audit rows where the operator reads them.
    audit_secret_name: str | None = None
    audit_secret_key: str = "DATABASE_URL"  # noqa: S105  # a key name, not a secret


AUDIT_URL_ENV: Final = "DBT_BACKFILL_AUDIT_URL"


def audit_env(defaults: JobDefaults) -> list[dict[str, Any]]:
    if not defaults.audit_secret_name:
        return []
    ref = {"name": defaults.audit_secret_name, "key": defaults.audit_secret_key}
    return [{"name": AUDIT_URL_ENV, "valueFrom": {"secretKeyRef": ref}}]


def build_job(owner: Owner, spec: BackfillSpec, window: Window, attempt: int, defaults: JobDefaults) -> dict[str, Any]:
    """The batch/v1 Job for one chunk attempt (ownerReferences are added by the caller)."""
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image or defaults.image,
        "imagePullPolicy": "IfNotPresent",
        # args, not command: the image's entrypoint (tini) stays PID 1 and forwards SIGTERM.
        "args": runner_command(owner, spec, window, attempt),
        "env": [
            {
                "name": "DATABASE_URL",
                "valueFrom": {"secretKeyRef": {"name": spec.secret_name, "key": spec.secret_key}},
            },
            *audit_env(defaults),
            {"name": "DBT_TARGET_PATH", "value": f"{WORK_DIR}/dbt/target"},
            {"name": "DBT_LOG_PATH", "value": f"{WORK_DIR}/dbt/logs"},
            {"name": "HOME", "value": WORK_DIR},
        ],
        "volumeMounts": [{"name": "scratch", "mountPath": WORK_DIR}],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if spec.resources:
        container["resources"] = dict(spec.resources)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": spec.service_account_name or defaults.service_account_name,
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUNNER_UID,
            "runAsGroup": RUNNER_UID,
            "fsGroup": RUNNER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [{"name": "scratch", "emptyDir": {}}],
    }
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in spec.tolerations]
    labels = job_labels(owner, spec, window, attempt)
    job_spec: dict[str, Any] = {
        # Retries belong to the operator (with backoff, audit and status); a pod-level retry
        # would rerun the chunk behind its back under the same attempt number.
        "backoffLimit": 0,
        # Marks a refusal on the Job itself (its Failed condition's reason), so the operator
        # knows from the Job alone that a retry would be refused again.
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_REFUSED]},
                }
            ]
        },
        "template": {"metadata": {"labels": labels}, "spec": pod_spec},
    }
    if spec.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if spec.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": cell_job_name(owner, spec, window, attempt),
            "namespace": owner.namespace,
            "labels": labels,
            "annotations": job_annotations(spec, window),
        },
        "spec": job_spec,
    }


def chunk_of(labels: Mapping[str, str]) -> tuple[int, int] | None:
    """(chunk, attempt) from a Job's labels, or None if it is not one of ours."""
    try:
        return int(labels[LABEL_CHUNK]), int(labels[LABEL_ATTEMPT])
    except (KeyError, ValueError):
        return None


def _time(text: Any) -> datetime | None:
    if not isinstance(text, str) or not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def job_view(job: Mapping[str, Any]) -> JobView | None:
    """Reduce a Job from the API to what the reconciler needs; None if it is not a chunk Job."""
    meta = job.get("metadata") or {}
    position = chunk_of(meta.get("labels") or {})
    if position is None:
        return None
    status = job.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    phase: JobPhase
    message = None
    refused = False
    failure = conditions.get("Failed") or conditions.get("FailureTarget")
    if status.get("succeeded") or "Complete" in conditions:
        phase = "succeeded"
    elif status.get("failed") or failure:
        phase = "failed"
        message = (failure or {}).get("message") or "the chunk's Job failed"
        refused = (failure or {}).get("reason") == REFUSED_REASON
    else:
        phase = "active"
    # The Job controller counts a Pod being deleted as failed while it still runs, and (since
    # 1.31) sets Complete/Failed only once no Pod is terminating: until then, a Pod may be alive.
    settled = ("Complete" in conditions or "Failed" in conditions) and not status.get("terminating")
    alive = phase == "active" or bool(status.get("active")) or not settled
    return JobView(
        name=meta.get("name", ""),
        chunk=position[0],
        attempt=position[1],
        phase=phase,
        started=_time(status.get("startTime")),
        finished=_time(status.get("completionTime"))
        or _time((conditions.get("Failed") or {}).get("lastTransitionTime")),
        message=message,
        deleting=bool(meta.get("deletionTimestamp")),
        created=_time(meta.get("creationTimestamp")),
        alive=alive,
        refused=refused,
    )


WakeKey = tuple[str, bool, bool]
#: A Job as the pass that created it left it: running, not being deleted.
JUST_CREATED: Final[WakeKey] = ("active", True, False)


def wake_key(job: Mapping[str, Any]) -> WakeKey | None:
    """What a pass of the owner would read from this Job: its phase, whether a Pod of it may
    still run, whether it is being deleted. A Job event wakes the owner only when this changes,
    so the Job's own creation, its Pod starting and its ready count cost no pass. A succeeded
    Job counts as settled: nothing waits for its Pod, only a failed attempt's retry does."""
    view = job_view(job)
    if view is None:
        return None
    alive = view.alive and view.phase != "succeeded"
    return view.phase, alive, bool((job.get("metadata") or {}).get("deletionTimestamp"))


def deletion_wakes(job: Mapping[str, Any]) -> bool:
    """Whether a DELETED watch event of this Job should wake its owner.

    Labelling a Job settled takes it out of the watch's selector, which the API server reports
    as DELETED (with the Job as it was before the label). A Job last seen finished, with no Pod
    that may still run and not being deleted, has nothing left for a pass to act on, whether it
    was settled or its TTL took it: its end already woke the owner. Anything else (a running
    Job deleted, a retry waiting for the Job to go) wakes it."""
    key = wake_key(job)
    return key is None or key[0] == "active" or key[1] or key[2]
