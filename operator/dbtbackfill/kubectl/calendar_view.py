"""The model behind ``kubectl dbf status``: a backfill's days as a calendar of chunk states.

Pure: dates -> grid cells -> state. Rendering (rich) lives in :mod:`dbtbackfill.kubectl.plugin`;
this module decides which day sits where and what state it shows, so that can be tested
without a terminal. Two layouts:

- **weeks**: one row per ISO week (Monday first), seven day columns; used for one tenant (or
  all tenants at once), and as the aggregate of a matrix with too many tenants for columns.
- **tenants**: one row per day, grouped by week, one column per tenant.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, Final, Literal

from dbtbackfill.core.planner import Cell, Window, expand_runs
from dbtbackfill.operator.reconcile import state_from_status
from dbtbackfill.operator.status import eta

CellState = Literal["failed", "running", "retrying", "pending", "cancelled", "succeeded"]
# Legend order, and the order in which an aggregate shows a day: the state that needs
# attention first (one failed tenant makes the day failed).
STATES: Final[tuple[CellState, ...]] = ("failed", "running", "retrying", "pending", "cancelled", "succeeded")
WEEKDAYS: Final = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
ALL_TENANTS: Final = "all tenants"


@dataclass(frozen=True)
class Chunk:
    """One chunk (a window, or a tenant x window cell) as the calendar sees it."""

    index: int
    tenant: str | None
    start: date
    end: date


@dataclass(frozen=True)
class GridCell:
    day: date
    state: CellState | None  # None: no chunk of this column covers the day


@dataclass(frozen=True)
class Row:
    label: str
    week: date  # the Monday of the row's week (rows of one week form one section)
    cells: tuple[GridCell | None, ...]  # None: outside the backfill's range


@dataclass(frozen=True)
class Grid:
    layout: Literal["weeks", "tenants"]
    columns: tuple[str, ...]  # the cell columns' headers (after the row label)
    rows: tuple[Row, ...]


def chunks_of(windows: Sequence[Window], tenant: str | None = None) -> list[Chunk]:
    """Chunks from the planner's cells (each carries its tenant) or plain windows (``tenant``'s)."""
    return [Chunk(w.index, w.tenant if isinstance(w, Cell) else tenant, w.start, w.end) for w in windows]


def chunk_states(status: Mapping[str, Any] | None, total: int) -> list[CellState]:
    """Each chunk's state, by index, from ``status.chunkState`` (what the operator recorded).

    A chunk with an attempt on record and no outcome is running; one waiting for its retry
    backoff is retrying. While Suspended, chunks not done wait for the resume (pending);
    once Cancelled (the backfill was deleted) they never run.
    """
    status = status or {}
    raw: Mapping[str, Any] = status.get("chunkState") or {}
    succeeded = expand_runs(raw.get("succeeded") or [])
    failed = expand_runs(raw.get("failed") or [])
    attempts = {int(k) for k in (raw.get("attempts") or {})}
    retry_at = {int(k) for k in (raw.get("retryAt") or {})}
    phase = status.get("phase")
    out: list[CellState] = []
    for i in range(total):
        if i in succeeded:
            out.append("succeeded")
        elif i in failed:
            out.append("failed")
        elif phase == "Cancelled":
            out.append("cancelled")
        elif phase == "Suspended":
            out.append("pending")
        elif i in retry_at:
            out.append("retrying")
        elif i in attempts:
            out.append("running")
        else:
            out.append("pending")
    return out


def launched(status: Mapping[str, Any] | None, index: int) -> bool:
    """Whether the operator ever launched chunk ``index`` (an attempt is on record, or it is done)."""
    raw: Mapping[str, Any] = (status or {}).get("chunkState") or {}
    done = expand_runs(raw.get("succeeded") or []) | expand_runs(raw.get("failed") or [])
    return str(index) in (raw.get("attempts") or {}) or index in done


def worst(states: Sequence[CellState]) -> CellState | None:
    """The state an aggregate shows for a day: the first of :data:`STATES` present."""
    present = set(states)
    return next((s for s in STATES if s in present), None)


def day_states(chunks: Sequence[Chunk], states: Sequence[CellState]) -> dict[str | None, dict[date, CellState]]:
    """tenant -> day -> state of the chunk covering that day (chunks span one or more days)."""
    out: dict[str | None, dict[date, CellState]] = {}
    for chunk in chunks:
        days = out.setdefault(chunk.tenant, {})
        day = chunk.start
        while day <= chunk.end:
            days[day] = states[chunk.index]
            day += timedelta(days=1)
    return out


def aggregate(per_tenant: Mapping[str | None, Mapping[date, CellState]]) -> dict[date, CellState]:
    days: dict[date, list[CellState]] = {}
    for by_day in per_tenant.values():
        for day, state in by_day.items():
            days.setdefault(day, []).append(state)
    return {day: s for day, states in days.items() if (s := worst(states)) is not None}


def monday_of(day: date) -> date:
    return day - timedelta(days=day.weekday())


def weeks_grid(start: date, end: date, states: Mapping[date, CellState]) -> Grid:
    """Rows = ISO weeks from the week of ``start`` to that of ``end``; columns Mon..Sun."""
    rows = []
    monday = monday_of(start)
    while monday <= end:
        cells: list[GridCell | None] = []
        for offset in range(7):
            day = monday + timedelta(days=offset)
            cells.append(GridCell(day, states.get(day)) if start <= day <= end else None)
        rows.append(Row(monday.isoformat(), monday, tuple(cells)))
        monday += timedelta(days=7)
    return Grid("weeks", WEEKDAYS, tuple(rows))


def tenants_grid(
    start: date, end: date, tenants: Sequence[str | None], per_tenant: Mapping[str | None, Mapping[date, CellState]]
) -> Grid:
    """Rows = the days of the range (their week groups them), columns = tenants."""
    rows = []
    day = start
    while day <= end:
        cells = tuple(GridCell(day, per_tenant.get(t, {}).get(day)) for t in tenants)
        rows.append(Row(f"{day.isoformat()} {WEEKDAYS[day.weekday()]}", monday_of(day), cells))
        day += timedelta(days=1)
    return Grid("tenants", tuple(t if t is not None else ALL_TENANTS for t in tenants), tuple(rows))


def calendar(start: date, end: date, chunks: Sequence[Chunk], states: Sequence[CellState], max_columns: int) -> Grid:
    """The heat map: a column per tenant when there are several and at most ``max_columns``,
    else the week calendar of the aggregate (each day in its worst state across tenants)."""
    per_tenant = day_states(chunks, states)
    tenants = list(dict.fromkeys(c.tenant for c in chunks))
    if 1 < len(tenants) <= max_columns:
        return tenants_grid(start, end, tenants, per_tenant)
    return weeks_grid(start, end, aggregate(per_tenant))


_WINDOW_PREFIX: Final = re.compile(r"^window \S+: ")
# dbt's error text goes on to the compiled file's path, which says nothing at a glance.
_NOISE: Final = ("compiled code at", "/")


def failure_summary(message: str, limit: int = 160) -> str:
    """A chunk's failure message as one line: dbt's error and its cause, without the window
    (shown beside it) or the compiled file's path."""
    lines = [line.strip() for line in message.strip().splitlines()]
    kept: list[str] = []
    for line in lines:
        if line.startswith(_NOISE):
            break
        if line:
            kept.append(line)
    text = _WINDOW_PREFIX.sub("", " ".join(kept or lines[:1]))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def counts(states: Sequence[CellState]) -> dict[CellState, int]:
    return {s: n for s in STATES if (n := sum(1 for x in states if x == s))}


@dataclass(frozen=True)
class Estimate:
    """When the chunks still to run should be done, from the durations observed so far."""

    finish: datetime | None
    mean_seconds: float | None
    observed: int  # finished chunks the mean is taken over
    remaining: int


def estimate(status: Mapping[str, Any] | None, total: int, parallelism: int, now: datetime) -> Estimate:
    """The operator's own estimate (:func:`dbtbackfill.operator.status.eta`): the mean duration of the
    chunks that succeeded (``status.chunkState.durations``) times the waves of ``parallelism``
    chunks still to run. Failed chunks do not count as still to run: they wait for retryFailed."""
    state = state_from_status(status)
    remaining = max(0, total - len(state.succeeded) - len(state.failed))
    mean = state.duration_total / state.duration_count if state.duration_count else None
    return Estimate(eta(state, remaining, parallelism, now), mean, state.duration_count, remaining)
