"""A backfill's ``.status``: phase, progress, compressed ranges, conditions, ETA.

Pure. The status stays small whatever the backfill's size: succeeded and failed chunks
are stored as date ranges and index runs, never one entry per chunk, so 3,650 daily
chunks fit well under etcd's object limit.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, Literal, cast

from dbtbackfill.core.planner import Cell, CellPlan, Window, compress_indices
from dbtbackfill.operator.reconcile import ChunkState, Phase, failures_to_status, state_to_status

ConditionStatus = Literal["True", "False", "Unknown"]
CONDITION_TYPES: Final = ("Succeeded", "Running", "Suspended")


def _format_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def date_ranges(windows: Sequence[Window], indices: frozenset[int] | set[int]) -> list[str]:
    """``["2024-01-01..2024-01-12", ...]``: runs of adjacent chunks as date ranges."""
    return [f"{windows[a].start}..{windows[b].end}" for a, b in compress_indices(indices) if b < len(windows)]


def _window_ranges(windows: Mapping[int, Window], indices: Iterable[int]) -> list[str]:
    return [f"{windows[a].start}..{windows[b].end}" for a, b in compress_indices(indices)]


@dataclass(frozen=True)
class _Grid:
    """Where each cell index lies: its tenant's position and its window's index. A
    :class:`CellPlan` answers by arithmetic, so a pass over 365,000 cells makes no cell."""

    tenants: tuple[str | None, ...]
    windows: Mapping[int, Window]
    locate: Callable[[int], tuple[int, int]]
    size: int


def _grid(cells: Sequence[Cell]) -> _Grid:
    if isinstance(cells, CellPlan):
        plan = cells
        return _Grid(plan.tenants, {w.index: w for w in plan.windows}, plan.position, len(plan))
    tenants = tuple(dict.fromkeys(c.tenant for c in cells))
    where = {t: i for i, t in enumerate(tenants)}
    cell_at = {c.index: (where[c.tenant], c.window_index) for c in cells}
    return _Grid(tenants, {c.window_index: c for c in cells}, cell_at.__getitem__, len(cells))


def _per_tenant(grid: _Grid, indices: Iterable[int]) -> list[list[int]]:
    """The window indices among ``indices``, for each tenant."""
    out: list[list[int]] = [[] for _ in grid.tenants]
    for i in indices:
        if 0 <= i < grid.size:
            t, w = grid.locate(i)
            out[t].append(w)
    return out


def matrix_date_ranges(cells: Sequence[Cell], indices: frozenset[int] | set[int]) -> list[str]:
    """Date ranges of the windows whose every tenant's cell is in ``indices``."""
    grid = _grid(cells)
    per_window = Counter(w for ws in _per_tenant(grid, indices) for w in ws)
    return _window_ranges(grid.windows, [w for w, n in per_window.items() if n == len(grid.tenants)])


def tenant_progress(cells: Sequence[Cell], state: ChunkState) -> list[dict[str, Any]]:
    """Counts and date ranges per tenant, tenants in the same state grouped into one entry.

    Grouping keeps the status small: a window-major run has most tenants at the same point, a
    tenant-major one has done tenants, one tenant in progress, and tenants not started. An
    entry names its tenants as runs in plan order, ``FIRST..LAST`` for consecutive tenants (ids
    never hold a dot), so 1,000 tenants take a handful of strings, not 1,000 ids.
    """
    grid = _grid(cells)
    done = _per_tenant(grid, state.succeeded)
    failed = _per_tenant(grid, state.failed)
    groups: dict[tuple[Any, ...], tuple[list[int], dict[str, Any]]] = {}
    for t in range(len(grid.tenants)):
        ok, bad = _window_ranges(grid.windows, done[t]), _window_ranges(grid.windows, failed[t])
        key = (len(done[t]), len(failed[t]), tuple(ok), tuple(bad))
        entry = {"succeeded": key[0], "failed": key[1], "succeededRanges": ok, "failedRanges": bad}
        groups.setdefault(key, ([], entry))[0].append(t)
    names = [t or "" for t in grid.tenants]
    out = []
    for members, entry in groups.values():
        runs = [names[a] if a == b else f"{names[a]}..{names[b]}" for a, b in compress_indices(members)]
        out.append({"tenants": runs, "count": len(members), **entry})
    return out


def expand_tenant_runs(runs: Sequence[str], tenants: Sequence[str]) -> list[str]:
    """Inverse of the tenant runs of :func:`tenant_progress`, given the plan's tenant list."""
    where = {t: i for i, t in enumerate(tenants)}
    out: list[str] = []
    for run in runs:
        first, _, last = run.partition("..")
        out += tenants[where[first] : where[last or first] + 1]
    return out


def eta(state: ChunkState, remaining: int, parallelism: int, now: datetime) -> datetime | None:
    """Average finished-chunk duration times the waves still to run."""
    if not state.duration_count or remaining <= 0:
        return None
    mean = state.duration_total / state.duration_count
    waves = -(-remaining // max(1, min(parallelism, remaining)))
    return now + timedelta(seconds=mean * waves)


def _condition(
    ctype: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    generation: int | None,
    previous: Mapping[str, Mapping[str, Any]],
    now: datetime,
) -> dict[str, Any]:
    before = previous.get(ctype) or {}
    # lastTransitionTime moves only when the status flips, per API conventions.
    moved = not before or before.get("status") != status
    return {
        "type": ctype,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": _format_time(now) if moved else str(before.get("lastTransitionTime")),
        "observedGeneration": generation,
    }


def conditions_for(
    phase: Phase,
    *,
    progress: str,
    blocked_by: str | None,
    failure: str | None,
    generation: int | None,
    previous: Sequence[Mapping[str, Any]],
    now: datetime,
) -> list[dict[str, Any]]:
    prev = {str(c.get("type")): c for c in previous}
    succeeded: tuple[ConditionStatus, str, str]
    if phase == "Succeeded":
        succeeded = ("True", "AllChunksSucceeded", f"all {progress.split('/')[-1]} chunk(s) succeeded")
    elif phase == "Failed":
        succeeded = ("False", "ChunksFailed", failure or "a chunk failed after all its retries")
    elif phase == "Cancelled":
        succeeded = ("False", "Cancelled", "the backfill was deleted before it finished")
    elif phase == "Queued":
        succeeded = ("Unknown", "Queued", f"waiting for overlapping backfill {blocked_by} to finish")
    elif phase == "Suspended":
        succeeded = ("Unknown", "Suspended", f"suspended at {progress}")
    else:
        succeeded = ("Unknown", "InProgress", f"{progress} chunk(s) succeeded")
    running: tuple[ConditionStatus, str, str] = (
        ("True", "ChunksRunning", f"{progress} chunk(s) succeeded")
        if phase == "Running"
        else ("False", phase, f"not running: {phase.lower()}")
    )
    suspended: tuple[ConditionStatus, str, str] = (
        ("True", "SpecSuspend", "spec.suspend is true; running Jobs were deleted")
        if phase == "Suspended"
        else ("False", "NotSuspended", "spec.suspend is false")
    )
    return [
        _condition(t, s, r, m, generation, prev, now)
        for t, (s, r, m) in zip(CONDITION_TYPES, (succeeded, running, suspended), strict=True)
    ]


def invalid_spec_status(
    message: str, generation: int | None, previous: Mapping[str, Any] | None, now: datetime
) -> dict[str, Any]:
    """Status for a spec that can never run: Failed, with the reason, and no Jobs."""
    return _unplanned_status("Failed", "InvalidSpec", message, generation, previous, now)


def waiting_status(
    reason: str, message: str, generation: int | None, previous: Mapping[str, Any] | None, now: datetime
) -> dict[str, Any]:
    """Status of a backfill that cannot be planned yet for a reason fixable outside it (its
    tenant list's ConfigMap is missing): Pending, with the reason on the Succeeded condition."""
    return _unplanned_status("Pending", reason, message, generation, previous, now)


def _unplanned_status(
    phase: Phase, reason: str, message: str, generation: int | None, previous: Mapping[str, Any] | None, now: datetime
) -> dict[str, Any]:
    prev_conditions = (previous or {}).get("conditions") or []
    conditions = conditions_for(
        phase,
        progress="0/0",
        blocked_by=None,
        failure=None,
        generation=generation,
        previous=prev_conditions,
        now=now,
    )
    conditions[0].update(reason=reason, message=message[:1024])
    return {"phase": phase, "observedGeneration": generation, "progress": "0/0", "conditions": conditions}


def summarise(
    *,
    windows: Sequence[Window],
    state: ChunkState,
    phase: Phase,
    running: frozenset[int],
    parallelism: int,
    generation: int | None,
    previous: Mapping[str, Any] | None,
    now: datetime,
    blocked_by: str | None = None,
    matrix: bool = False,
) -> dict[str, Any]:
    """The whole ``.status`` for one reconcile pass (the caller patches only if it changed).

    ``matrix``: ``windows`` are the cells of a tenant x window plan. Counts are of cells, the
    date ranges hold the days done (or failed) for every tenant, and ``tenantProgress`` has
    the counts and ranges per tenant.
    """
    previous = previous or {}
    total = len(windows)
    done = len(state.succeeded)
    failed = len(state.failed)
    pending = max(0, total - done - failed - len(running))
    progress = f"{done}/{total}"
    failure = state.recent_failures[-1].message if state.recent_failures else None
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "phase": phase,
        "progress": progress,
        "chunks": {
            "total": total,
            "succeeded": done,
            "failed": failed,
            "running": len(running),
            "pending": pending,
        },
        "recordsProcessed": state.records,
        "succeededRanges": date_ranges(windows, state.succeeded),
        "failedRanges": date_ranges(windows, state.failed),
        **(_matrix_fields(windows, state) if matrix else {}),
        "recentFailures": failures_to_status(state),
        "chunkState": state_to_status(state),
        "queuedBehind": blocked_by if phase == "Queued" else None,
        "conditions": conditions_for(
            phase,
            progress=progress,
            blocked_by=blocked_by,
            failure=failure,
            generation=generation,
            previous=previous.get("conditions") or [],
            now=now,
        ),
    }
    started = previous.get("startTime")
    if started is None and (state.attempts or state.succeeded or running):
        started = _format_time(now)
    status["startTime"] = started
    if phase in ("Succeeded", "Failed"):
        status["completionTime"] = previous.get("completionTime") or _format_time(now)
        status["estimatedCompletionTime"] = None
    else:
        status["completionTime"] = None
        moment = eta(state, total - done, parallelism, now) if phase == "Running" else None
        status["estimatedCompletionTime"] = _format_time(moment) if moment else None
    return status


def _matrix_fields(windows: Sequence[Window], state: ChunkState) -> dict[str, Any]:
    cells = cast(Sequence[Cell], windows)
    grid = _grid(cells)
    # Failed days: any tenant's cell of the day failed (not all of them, as for succeeded).
    failed_days = {w for ws in _per_tenant(grid, state.failed) for w in ws}
    return {
        "succeededRanges": matrix_date_ranges(cells, state.succeeded),
        "failedRanges": _window_ranges(grid.windows, failed_days),
        "tenantProgress": tenant_progress(cells, state),
    }


FAILURE_CONDITION: Final = "ReconcileFailure"
_FAILURE_REASONS: Final = frozenset({"InProgress"})


def api_failure_reason(verb: str, resource: str) -> str:
    """``JobCreateFailed``, ``PodListFailed``...: the Event and condition reason of a failed call."""
    kind = {"jobs": "Job", "pods": "Pod", "events": "Event", "dbtbackfills": "Backfill", "configmaps": "ConfigMap"}.get(
        resource.split("/")[0], "Api"
    )
    if resource.endswith("/status"):
        kind = "Status"
    return f"{kind}{verb.capitalize()}Failed"


def with_api_failure(
    status: Mapping[str, Any],
    previous: Mapping[str, Any] | None,
    failure: tuple[str, str] | None,
    *,
    failures: int,
    retry_at: datetime | None,
    generation: int | None,
    now: datetime,
) -> dict[str, Any]:
    """``status`` plus the ``ReconcileFailure`` condition: True with the API's reason and message
    while calls fail, False once they work again. Absent on backfills that never saw a failure,
    so a healthy status carries nothing extra. While Pending or Running, ``Succeeded`` (Unknown)
    carries the same reason, which is what ``kubectl describe`` and Argo CD show first."""
    previous = previous or {}
    prev = {str(c.get("type")): c for c in previous.get("conditions") or []}
    out = dict(status)
    conditions = [dict(c) for c in out.get("conditions") or [] if c.get("type") != FAILURE_CONDITION]
    out["apiFailures"] = failures if failure else None
    out["apiRetryAt"] = _format_time(retry_at) if failure and retry_at else None
    if failure is None and FAILURE_CONDITION not in prev:
        out["conditions"] = conditions
        return out
    if failure:
        reason, message = failure
        failed = _condition(FAILURE_CONDITION, "True", reason, message[:1024], generation, prev, now)
        for c in conditions:
            if c.get("type") == "Succeeded" and c.get("status") == "Unknown" and c.get("reason") in _FAILURE_REASONS:
                c.update(reason=reason, message=message[:1024])
    else:
        failed = _condition(
            FAILURE_CONDITION, "False", "Recovered", "the operator's API calls succeed again", generation, prev, now
        )
    out["conditions"] = [*conditions, failed]
    return out


def changed(previous: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch (RFC 7386) taking ``previous`` to ``new``, holding only what differs.

    Keys of ``previous`` that ``new`` does not manage are left alone. Inside nested objects,
    keys that disappeared are sent as null: merge patches merge maps, so a chunk that left
    ``chunkState.retryAt`` would otherwise stay there forever.
    """
    previous = previous or {}
    patch: dict[str, Any] = {}
    for key, value in new.items():
        before = previous.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            nested = changed(before, value)
            nested.update({gone: None for gone in before.keys() - value.keys()})
            if nested:
                patch[key] = nested
        elif before != value:
            patch[key] = value
    return patch


def argocd_health(obj: Mapping[str, Any]) -> tuple[str, str]:
    """The same mapping as ``deploy/argocd/health.lua``, tested against the same cases."""
    status = obj.get("status")
    status = status if isinstance(status, Mapping) else None
    conditions = (status or {}).get("conditions")
    succeeded: Mapping[str, Any] | None = None
    if isinstance(conditions, list):
        succeeded = next((c for c in conditions if isinstance(c, Mapping) and c.get("type") == "Succeeded"), None)
    raw_phase = (status or {}).get("phase")
    phase = raw_phase if isinstance(raw_phase, str) and raw_phase else None

    def message_of(c: Mapping[str, Any] | None) -> str | None:
        text = (c or {}).get("message")
        return text if isinstance(text, str) and text else None

    def progress() -> str:
        assert status is not None
        parts = []
        chunks = status.get("chunks")
        chunks = chunks if isinstance(chunks, Mapping) else None
        text = status.get("progress")
        if isinstance(text, str) and text:
            parts.append(f"{text} chunks done")
        elif chunks is not None and isinstance(chunks.get("total"), int | float):
            done = (chunks.get("succeeded") or 0) + (chunks.get("failed") or 0)
            parts.append(f"{int(done)}/{int(chunks['total'])} chunks done")
        if chunks is not None:
            if (chunks.get("failed") or 0) > 0:
                parts.append(f"{int(chunks['failed'])} failed")
            if (chunks.get("running") or 0) > 0:
                parts.append(f"{int(chunks['running'])} running")
        return ", ".join(parts)

    def join(prefix: str, detail: str) -> str:
        return f"{prefix}: {detail}" if detail else prefix

    decided = succeeded is not None and succeeded.get("status") in ("True", "False")
    if status is None or (phase is None and not decided):
        return "Progressing", message_of(succeeded) or "Waiting for operator"
    generation = (obj.get("metadata") or {}).get("generation")
    observed = status.get("observedGeneration")
    if isinstance(generation, int | float) and isinstance(observed, int | float) and observed < generation:
        return "Progressing", f"Waiting for operator to observe generation {int(generation)}"
    if phase == "Pending":
        return "Progressing", join("Pending", progress())
    if phase == "Queued":
        behind = status.get("queuedBehind")
        prefix = f"Queued behind {behind}" if isinstance(behind, str) and behind else "Queued"
        return "Progressing", join(prefix, progress())
    if phase == "Running":
        message = join("Running", progress())
        when = status.get("estimatedCompletionTime")
        if isinstance(when, str) and when:
            message += f" (ETA {when})"
        return "Progressing", message
    if phase == "Suspended":
        return "Suspended", join("Suspended", progress())
    if succeeded is not None and succeeded.get("status") == "True":
        return "Healthy", message_of(succeeded) or join("Succeeded", progress())
    if succeeded is not None and succeeded.get("status") == "False":
        return "Degraded", message_of(succeeded) or join(str(succeeded.get("reason") or phase or "Failed"), progress())
    if phase == "Succeeded":
        return "Healthy", join("Succeeded", progress())
    if phase in ("Failed", "Cancelled"):
        return "Degraded", join(phase, progress())
    return "Unknown", f"Unrecognised phase {phase}"
