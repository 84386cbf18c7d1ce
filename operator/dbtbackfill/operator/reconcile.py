"""The operator's decisions, as one pure function of (spec, recorded state, observed Jobs, now).

Pure: no kopf, no kubernetes, no database. Everything the operator knows is rebuilt on
every pass from the CR's ``status.chunkState`` plus the Jobs listed by label, so an
operator killed at any moment and restarted decides the same thing again: it never
launches a Job twice (names are deterministic, and a Job it sees wins over a record it
lost) and never forgets a chunk (a chunk neither succeeded, failed nor running is
launched again).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Final, Literal

from dbtbackfill.core.planner import Cell, CellPlan, Window, compress_indices, expand_runs
from dbtbackfill.core.spec import BackfillSpec, parse_spec

Phase = Literal["Pending", "Queued", "Running", "Succeeded", "Failed", "Suspended", "Cancelled"]
JobPhase = Literal["active", "succeeded", "failed"]
TERMINAL_PHASES: Final = frozenset({"Succeeded", "Failed", "Cancelled"})
MAX_RECENT_FAILURES: Final = 10
MAX_MESSAGE_CHARS: Final = 1024
# While a due chunk waits for an earlier attempt's Pods to go, look again this often.
BUSY_POLL_SECONDS: Final = 5.0
API_BACKOFF_SECONDS: Final = 5.0
MAX_API_BACKOFF_SECONDS: Final = 300.0


@dataclass(frozen=True)
class JobView:
    """What the operator needs to know about one Job (built from the API object by the caller)."""

    name: str
    chunk: int
    attempt: int
    phase: JobPhase
    started: datetime | None = None
    finished: datetime | None = None
    message: str | None = None
    records: int | None = None
    deleting: bool = False
    created: datetime | None = None
    alive: bool = False  # a Pod of it may still run (active, terminating, or not yet settled)
    pod_started: bool = True  # some Pod of it got a container running (or finished)
    start_problem: str | None = None  # why no Pod started, when none did
    refused: bool = False  # the runner refused the chunk for good (exit 3): a retry would be refused too


@dataclass(frozen=True)
class Failure:
    chunk: int
    window: str
    attempts: int
    message: str
    time: datetime
    tenant: str | None = None


def describe(window: Window) -> str:
    """``2024-01-01..2024-01-01``, or ``tenant acme, 2024-01-01..2024-01-01`` for a cell."""
    if isinstance(window, Cell) and window.tenant is not None:
        return f"tenant {window.tenant}, {window.label()}"
    return window.label()


def tenant_in(window: Window) -> str | None:
    return window.tenant if isinstance(window, Cell) else None


@dataclass(frozen=True)
class ChunkState:
    """The part of a backfill's progress that Jobs alone cannot tell (they are TTL-deleted)."""

    succeeded: frozenset[int] = frozenset()
    failed: frozenset[int] = frozenset()  # retries exhausted
    attempts: Mapping[int, int] = field(default_factory=dict)  # latest attempt launched
    retry_base: Mapping[int, int] = field(default_factory=dict)  # attempts not counted toward the limit
    retry_at: Mapping[int, datetime] = field(default_factory=dict)  # failed, waiting for backoff
    records: int = 0
    duration_count: int = 0
    duration_total: float = 0.0
    recent_failures: tuple[Failure, ...] = ()

    def tries(self, chunk: int) -> int:
        return self.attempts.get(chunk, 0) - self.retry_base.get(chunk, 0)


@dataclass(frozen=True)
class Launch:
    window: Window
    attempt: int


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class Decision:
    state: ChunkState
    phase: Phase
    launch: tuple[Launch, ...]
    delete: tuple[str, ...]
    running: frozenset[int]
    events: tuple[Event, ...]
    wake_after: float | None  # seconds until a retry is due, if one is waiting
    blocked_by: str | None = None
    # (chunk, attempt, reason) of attempts failed now for never starting: no runner wrote
    # their audit row, so the operator does.
    unstarted: tuple[tuple[int, int, str], ...] = ()


def parse_time(text: Any) -> datetime | None:
    if not isinstance(text, str) or not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _format_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def state_from_status(status: Mapping[str, Any] | None) -> ChunkState:
    """Read ``status.chunkState`` (and recentFailures); tolerant of a missing or empty status."""
    status = status or {}
    raw: Mapping[str, Any] = status.get("chunkState") or {}
    durations: Mapping[str, Any] = raw.get("durations") or {}
    failures = tuple(
        Failure(
            chunk=int(f["chunk"]),
            window=str(f.get("window", "")),
            attempts=int(f.get("attempts", 0)),
            message=str(f.get("message", "")),
            time=parse_time(f.get("time")) or datetime.min,
            tenant=f.get("tenant"),
        )
        for f in status.get("recentFailures") or ()
    )
    return ChunkState(
        succeeded=frozenset(expand_runs(raw.get("succeeded") or [])),
        failed=frozenset(expand_runs(raw.get("failed") or [])),
        attempts={int(k): int(v) for k, v in (raw.get("attempts") or {}).items()},
        retry_base={int(k): int(v) for k, v in (raw.get("retryBase") or {}).items()},
        retry_at={int(k): t for k, v in (raw.get("retryAt") or {}).items() if (t := parse_time(v))},
        records=int(raw.get("records") or 0),
        duration_count=int(durations.get("count") or 0),
        duration_total=float(durations.get("totalSeconds") or 0.0),
        recent_failures=failures,
    )


def state_to_status(state: ChunkState) -> dict[str, Any]:
    """The compact ``chunkState``: index runs and small maps, bounded by parallelism."""
    return {
        "succeeded": [list(r) for r in compress_indices(state.succeeded)],
        "failed": [list(r) for r in compress_indices(state.failed)],
        "attempts": {str(k): v for k, v in sorted(state.attempts.items())},
        "retryBase": {str(k): v for k, v in sorted(state.retry_base.items()) if v},
        "retryAt": {str(k): _format_time(v) for k, v in sorted(state.retry_at.items())},
        "records": state.records,
        "durations": {"count": state.duration_count, "totalSeconds": round(state.duration_total, 3)},
    }


def failures_to_status(state: ChunkState) -> list[dict[str, Any]]:
    return [
        {
            "chunk": f.chunk,
            "window": f.window,
            **({"tenant": f.tenant} if f.tenant is not None else {}),
            "attempts": f.attempts,
            "message": f.message,
            "time": _format_time(f.time),
        }
        for f in state.recent_failures
    ]


def _absorb(
    state: ChunkState, windows: Sequence[Window], spec: BackfillSpec, jobs: Sequence[JobView], now: datetime
) -> tuple[ChunkState, list[Event]]:
    """Fold finished Jobs into the recorded state; each outcome is counted once."""
    succeeded = set(state.succeeded)
    failed = set(state.failed)
    attempts = dict(state.attempts)
    retry_base = dict(state.retry_base)
    retry_at = dict(state.retry_at)
    records, count, total = state.records, state.duration_count, state.duration_total
    recent = list(state.recent_failures)
    events: list[Event] = []
    for job in sorted(jobs, key=lambda j: (j.chunk, j.attempt)):
        if job.chunk >= len(windows):
            continue
        if job.chunk in succeeded:
            continue  # done; its finished Jobs linger until their TTL and change nothing
        # A Job we created but never recorded (the operator died in between) still counts,
        # and if it is a retry, that retry is no longer waiting for its backoff.
        if job.attempt > state.attempts.get(job.chunk, 0):
            retry_at.pop(job.chunk, None)
        attempts[job.chunk] = max(attempts.get(job.chunk, 0), job.attempt)
        if job.attempt != attempts[job.chunk]:
            continue
        if job.phase == "succeeded":
            succeeded.add(job.chunk)
            failed.discard(job.chunk)
            for table in (attempts, retry_base, retry_at):
                table.pop(job.chunk, None)
            records += job.records or 0
            if job.started and job.finished:
                count += 1
                total += max(0.0, (job.finished - job.started).total_seconds())
        elif job.phase == "failed" and job.chunk not in failed and job.chunk not in retry_at:
            window = windows[job.chunk]
            tries = job.attempt - retry_base.get(job.chunk, 0)
            if tries < 1:
                continue  # an attempt retryFailed has forgiven: already reported, not charged again
            message = (job.message or "chunk Job failed").strip()[:MAX_MESSAGE_CHARS]
            recent = [*recent, Failure(job.chunk, window.label(), job.attempt, message, now, tenant_in(window))]
            recent = recent[-MAX_RECENT_FAILURES:]
            if tries <= spec.retry_limit and not job.refused:
                delay = spec.backoff_for(tries)
                retry_at[job.chunk] = now + timedelta(seconds=delay)
                events.append(
                    Event(
                        "Warning",
                        "ChunkRetry",
                        f"chunk {job.chunk} ({describe(window)}) failed on attempt {tries}; "
                        f"retrying in {delay}s: {message[:200]}",
                    )
                )
            else:
                failed.add(job.chunk)
                events.append(
                    Event(
                        "Warning",
                        "ChunkFailed",
                        f"chunk {job.chunk} ({describe(window)}) "
                        + ("was refused, not retried" if job.refused else f"failed after {tries} attempt(s)")
                        + f": {message[:200]}",
                    )
                )
    new_state = ChunkState(
        frozenset(succeeded),
        frozenset(failed),
        attempts,
        retry_base,
        retry_at,
        records,
        count,
        total,
        tuple(recent),
    )
    return new_state, events


def reset_failed(state: ChunkState) -> ChunkState:
    """``retryFailed`` changed: failed chunks get a fresh retry budget; nothing else moves."""
    base = dict(state.retry_base)
    for chunk in state.failed:
        base[chunk] = state.attempts.get(chunk, 0)
    return replace(state, failed=frozenset(), retry_base=base, recent_failures=())


def api_backoff(failures: int) -> float:
    """Seconds before retrying after ``failures`` consecutive failed API calls (5 s doubling, 5 min cap)."""
    return float(min(MAX_API_BACKOFF_SECONDS, API_BACKOFF_SECONDS * 2.0 ** max(0, failures - 1)))


def vanished(state: ChunkState, jobs: Sequence[JobView]) -> list[tuple[int, int]]:
    """(chunk, attempt) recorded as launched and charged, whose Job is gone unseen.

    Its TTL may have deleted it after it finished while the operator was away: only the
    chunk's audit row can still tell how it ended (see :func:`view_from_audit`).
    """
    newest: dict[int, int] = {}
    for job in jobs:
        newest[job.chunk] = max(newest.get(job.chunk, 0), job.attempt)
    return [
        (chunk, attempt)
        for chunk, attempt in sorted(state.attempts.items())
        if newest.get(chunk, 0) < attempt
        and chunk not in state.succeeded
        and chunk not in state.failed
        and chunk not in state.retry_at
        and state.tries(chunk) > 0
    ]


def settled(state: ChunkState, jobs: Sequence[JobView], chunks: int) -> tuple[str, ...]:
    """Names of finished Jobs whose end ``state`` records, so that once ``state`` is written no
    pass needs to see them again (they are labelled settled and listed no more).

    A succeeded chunk's Jobs change nothing (:func:`_absorb` skips them). A failed attempt is
    recorded when a newer attempt is, or when the chunk is failed, waiting for its retry, or
    forgiven by retryFailed: :func:`vanished` and the lost-Job rule skip each of those. A failed
    Job is settled only once no Pod of it may run: until then it keeps its chunk busy."""
    out = []
    for job in jobs:
        c = job.chunk
        if job.phase == "active" or job.deleting or c >= chunks:
            continue
        if c in state.succeeded:
            out.append(job.name)
            continue
        if job.alive:
            continue
        latest = state.attempts.get(c, 0)
        superseded = job.attempt < latest
        ended = job.phase == "failed" and job.attempt == latest
        if superseded or (ended and (c in state.failed or c in state.retry_at or state.tries(c) <= 0)):
            out.append(job.name)
    return tuple(out)


def to_label(settled_names: Sequence[str], keep: int) -> tuple[str, ...]:
    """The settled Jobs to label now: all but ``keep`` of them, so a pass never lists more than
    ``keep`` finished Jobs, and a backfill with fewer pays no label write at all."""
    return tuple(settled_names[: max(0, len(settled_names) - keep)])


def view_from_audit(
    chunk: int, attempt: int, status: str | None, records: int | None, error: str | None, name: str
) -> JobView:
    """A vanished attempt as its audit row tells it. A row still ``running`` (the Pod was killed
    before the runner could close it) or no row at all counts as a failure: charged to the
    retry budget, so a chunk whose Jobs keep vanishing cannot run forever."""
    if status == "completed":
        return JobView(name=name, chunk=chunk, attempt=attempt, phase="succeeded", records=records)
    if status == "failed":
        return JobView(name=name, chunk=chunk, attempt=attempt, phase="failed", message=error or "chunk failed")
    seen = f"its audit row still says {status}" if status else "it wrote no audit row"
    message = f"the Job of attempt {attempt} was deleted before the operator saw it finish, and {seen}"
    return JobView(name=name, chunk=chunk, attempt=attempt, phase="failed", message=message)


def _never_started(jobs: Sequence[JobView], spec: BackfillSpec, now: datetime) -> dict[str, str]:
    """Active Jobs with no started Pod past ``startDeadlineSeconds``: name -> reason."""
    deadline = timedelta(seconds=spec.start_deadline_seconds)
    out = {}
    for job in jobs:
        if job.phase == "active" and not job.pod_started and job.created and now - job.created >= deadline:
            why = job.start_problem or "no container was created"
            out[job.name] = f"no Pod started within startDeadlineSeconds={spec.start_deadline_seconds}: {why}"
    return out


def decide(
    spec: BackfillSpec,
    windows: Sequence[Window],
    state: ChunkState,
    jobs: Sequence[JobView],
    now: datetime,
    *,
    blocked_by: str | None = None,
    busy: frozenset[int] = frozenset(),
    launch_after: datetime | None = None,
) -> Decision:
    """What to do next. ``blocked_by`` names an overlapping backfill to wait for, if any.

    ``busy`` chunks have a Pod alive that no listed Job shows (its Job is already gone), or an
    outcome that cannot be known yet; like chunks with a live Job, none is launched: two dbt
    processes never write one window. ``launch_after``: after a failed Job create, nothing is
    launched before that moment (the API's backoff).
    """
    recorded = dict(state.attempts)  # what the status already says was launched
    stuck = _never_started(jobs, spec, now)
    jobs = [replace(j, phase="failed", message=stuck[j.name], finished=now) if j.name in stuck else j for j in jobs]
    state, events = _absorb(state, windows, spec, jobs, now)
    current = [j for j in jobs if j.phase == "active" and j.attempt == state.attempts.get(j.chunk)]
    stale = [j.name for j in jobs if j.phase == "active" and j not in current]
    running = frozenset(j.chunk for j in current)
    delete = list(stale) + [j.name for j in jobs if j.name in stuck and not j.deleting]
    busy = busy | {j.chunk for j in jobs if j.phase == "active" or j.alive}
    launch: list[Launch] = []
    attempts = dict(state.attempts)
    retry_base = dict(state.retry_base)
    retry_at = dict(state.retry_at)

    # A chunk with an attempt on record but no Job, result or pending retry lost its Job
    # (suspend deleted it, someone deleted it, or its TTL ran out before we saw it). Run
    # it again under a new attempt number, without charging that to its retry budget.
    # Look for the recorded attempt's own Job: an older attempt's finished Job may still be
    # listed. A chunk with no charged attempt (retryFailed forgave them) simply launches again.
    seen = {(j.chunk, j.attempt) for j in jobs}
    for chunk, attempt in state.attempts.items():
        lost = (chunk, attempt) not in seen and chunk not in state.failed and chunk not in state.succeeded
        if lost and chunk not in retry_at and state.tries(chunk) > 0:
            retry_base[chunk] = retry_base.get(chunk, 0) + 1
            retry_at[chunk] = now  # due at once; the launch below takes attempt + 1

    if spec.suspend:
        # Only Jobs the status already records: deleting one whose creation was never recorded
        # would let a later pass launch the same (chunk, attempt), name and audit id again.
        released = [j for j in current if not j.deleting and j.attempt <= recorded.get(j.chunk, 0)]
        delete += [j.name for j in released]
        for job in released:
            # Not the chunk's fault: on resume it runs again under a new attempt, uncharged, and
            # the deleted Job's end (the Job controller counts it failed) is not absorbed.
            retry_base[job.chunk] = retry_base.get(job.chunk, 0) + 1
            retry_at[job.chunk] = now
        phase: Phase = "Suspended"
    elif len(state.succeeded) == len(windows):
        phase = "Succeeded"
    elif state.failed:
        # Fail fast, like the CLI: no new chunk starts once one has exhausted its retries;
        # chunks already running finish. retryFailed resumes from here.
        phase = "Failed" if not running else "Running"
    elif blocked_by and not running:
        phase = "Queued"
    else:
        # A chunk waiting for its backoff lends its slot, but at most parallelism of them:
        # otherwise an outage sweeps the whole plan, one doomed Job and status entry per chunk.
        backing_off = sum(1 for c, t in retry_at.items() if t > now and c not in running and c not in state.failed)
        capacity = spec.parallelism - len(running) - max(0, backing_off - spec.parallelism)
        holding = launch_after is not None and launch_after > now
        # A matrix plan's cell index is its position: no cell is made just to be skipped.
        order = range(len(windows)) if isinstance(windows, CellPlan) else [w.index for w in windows]
        for position, c in enumerate(order):
            if capacity <= 0 or holding:
                break
            if c in state.succeeded or c in running or c in state.failed:
                continue
            if c in busy:
                continue  # an earlier attempt's Pod is still alive (terminating, or not gone yet)
            due = retry_at.get(c)
            if due is not None and due > now:
                continue
            attempt = attempts.get(c, 0) + 1
            launch.append(Launch(windows[position], attempt))
            attempts[c] = attempt
            retry_at.pop(c, None)
            capacity -= 1
        phase = "Running" if (running or launch or state.attempts or state.succeeded) else "Pending"

    new_state = replace(state, attempts=attempts, retry_base=retry_base, retry_at=retry_at)
    if launch and not state.attempts and not state.succeeded:
        events.insert(
            0, Event("Normal", "Started", f"launching {len(windows)} chunk(s), parallelism {spec.parallelism}")
        )
    launched = {item.window.index for item in launch}
    waits = [(t - now).total_seconds() for c, t in retry_at.items() if c not in running and t > now]
    if any(c in busy and c not in running and c not in launched for c in retry_at):
        waits.append(BUSY_POLL_SECONDS)
    deadline = timedelta(seconds=spec.start_deadline_seconds)
    waits += [
        max(1.0, (j.created + deadline - now).total_seconds())
        for j in jobs
        if j.phase == "active" and not j.pod_started and j.created and not j.deleting
    ]
    if launch_after is not None and launch_after > now:
        waits.append((launch_after - now).total_seconds())
    wake = min(waits) if waits and not spec.suspend else None
    unstarted = tuple((j.chunk, j.attempt, stuck[j.name]) for j in jobs if j.name in stuck and not j.deleting)
    return Decision(new_state, phase, tuple(launch), tuple(delete), running, tuple(events), wake, blocked_by, unstarted)


@dataclass(frozen=True)
class Peer:
    """Another DbtBackfill in the namespace, as the overlap guard sees it."""

    name: str
    created: str
    spec: BackfillSpec
    phase: str | None
    started: bool
    tenants: tuple[str, ...] | None = None  # a tenantIdsFrom peer's snapshot, once taken


# Only a backfill that has not started consults its peers (``blocking_peer``); a started one
# never waits for another, so a peer's end has nothing to tell it.
UNSTARTED_PHASES: Final = frozenset({"Pending", "Queued"})


def snapshot_ids(status: Mapping[str, Any] | None) -> tuple[str, ...] | None:
    """The tenant list a tenantIdsFrom backfill took from its ConfigMap (``status.tenants.ids``)."""
    ids = ((status or {}).get("tenants") or {}).get("ids")
    return tuple(str(i) for i in ids) if isinstance(ids, list) and ids else None


def waiting_for_peers(phases: Mapping[str, str], backfills: Iterable[str]) -> list[str]:
    """Of ``backfills``, those a peer's end may unblock: last seen not started, or not seen yet.

    Waking every backfill instead costs a full reconcile pass each (several API reads) per
    finished peer, which with hundreds of live backfills delays the passes that matter.
    """
    return [b for b in backfills if phases.get(b) is None or phases[b] in UNSTARTED_PHASES]


def blocking_peer(
    name: str,
    created: str,
    spec: BackfillSpec,
    peers: Sequence[Peer],
    tenants: Sequence[str | None] | None = None,
) -> str | None:
    """The overlapping backfill this one must wait for, or None.

    A backfill waits for any overlapping one that has started and not ended, and for
    overlapping ones created before it that have not started yet, so that of two
    backfills created together exactly one (the older) goes first.
    """
    from dbtbackfill.core.spec import overlaps

    for peer in sorted(peers, key=lambda p: (p.created, p.name)):
        if peer.name == name or not overlaps(spec, peer.spec, tenants, peer.tenants):
            continue
        if peer.phase in TERMINAL_PHASES:
            continue
        holds = peer.started and peer.phase in ("Running", "Suspended")
        ahead = not peer.started and not peer.spec.suspend and (peer.created, peer.name) < (created, name)
        if holds or ahead:
            return peer.name
    return None


def peer_of(item: Mapping[str, Any]) -> Peer | None:
    """The overlap guard's view of another DbtBackfill, or None when its spec cannot be parsed.

    A backfill with an invalid spec never runs, so it blocks nobody; and whatever is wrong
    with it must not stop the guard from seeing the others (one bad object would otherwise
    stall every backfill in its namespace).
    """
    try:
        spec = parse_spec(item.get("spec") or {})
        meta = item["metadata"]
        status = item.get("status") or {}
        return Peer(
            name=meta["name"],
            created=meta.get("creationTimestamp") or "",
            spec=spec,
            phase=status.get("phase"),
            started=bool(status.get("startTime")),
            tenants=snapshot_ids(status) if spec.tenant_ids_from is not None else None,
        )
    except (ValueError, ArithmeticError, LookupError, TypeError, AttributeError):
        return None  # SpecError is a ValueError
