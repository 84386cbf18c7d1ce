"""Calendar windows for a backfill, and validation of the inputs that define them.

Pure: no I/O, no kopf, no kubernetes, no dbt. The CLI and the operator both plan
through :func:`plan_windows`, so a chunk means the same thing in both.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Final, Literal, get_args, overload

from dateutil.relativedelta import relativedelta

ChunkUnit = Literal["day", "week", "month"]
CHUNK_UNITS: Final[tuple[str, ...]] = get_args(ChunkUnit)

# A tenant id reaches SQL (quoted) and Kubernetes label values: at most 63 characters of
# [A-Za-z0-9_-], starting alphanumeric. The dot is left out because dbt selectors and schema
# names treat it specially. It may end in '-' or '_', which a label value may not: the
# operator labels such a tenant with a prefix and a hash (jobs.tenant_label).
TENANT_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"
_TENANT_RE: Final = re.compile(TENANT_ID_PATTERN)
_DATE_RE: Final = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")

# Ten years of daily chunks: beyond this a single object is the wrong tool.
MAX_WINDOWS: Final = 3660


class PlanError(ValueError):
    """Input that can never produce a valid plan. The message is one line, fit for users."""


@dataclass(frozen=True, order=True)
class Window:
    """One chunk of a backfill: an inclusive date range with its position in the plan."""

    index: int
    start: date
    end: date

    @property
    def days(self) -> int:
        return (self.end - self.start).days + 1

    def label(self) -> str:
        return f"{self.start.isoformat()}..{self.end.isoformat()}"


def parse_date(text: str, field: str = "date") -> date:
    """Parse a strict ``YYYY-MM-DD`` date; anything else is a :class:`PlanError`."""
    if not isinstance(text, str) or not _DATE_RE.fullmatch(text):
        raise PlanError(f"{field} must be a date in YYYY-MM-DD format, got {text!r}")
    try:
        return datetime.strptime(text, "%Y-%m-%d").date()
    except ValueError:
        raise PlanError(f"{field} is not a real calendar date: {text!r}") from None


def validate_range(start: date, end: date) -> None:
    # The exact text is quoted by the troubleshooting docs; keep it stable.
    if start > end:
        raise PlanError("start_date must be <= end_date")


def validate_tenant_id(tenant_id: str | None) -> str | None:
    """Return the tenant id unchanged if it is safe, None if it is None; raise otherwise."""
    if tenant_id is None:
        return None
    if not isinstance(tenant_id, str) or not _TENANT_RE.fullmatch(tenant_id):
        raise PlanError(
            f"tenant_id must match {TENANT_ID_PATTERN} (letters, digits, '_' and '-', "
            f"at most 63 characters), got {tenant_id!r}"
        )
    return tenant_id


def validate_unit(unit: str, size: int) -> ChunkUnit:
    if unit not in CHUNK_UNITS:
        raise PlanError(f"chunk unit must be one of {', '.join(CHUNK_UNITS)}, got {unit!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise PlanError(f"chunk size must be a positive whole number, got {size!r}")
    return unit  # type: ignore[return-value]  # membership checked above


def _period_start(day: date, unit: ChunkUnit) -> date:
    if unit == "week":
        return day - timedelta(days=day.weekday())  # ISO weeks start on Monday
    if unit == "month":
        return day.replace(day=1)
    return day


def _step(unit: ChunkUnit, size: int) -> relativedelta:
    if unit == "week":
        return relativedelta(weeks=size)
    if unit == "month":
        return relativedelta(months=size)
    return relativedelta(days=size)


def plan_windows(start: date, end: date, unit: str = "day", size: int = 1) -> list[Window]:
    """Split ``[start, end]`` (inclusive) into calendar-aligned windows.

    Windows follow calendar boundaries (days, ISO weeks starting Monday, calendar
    months), ``size`` units at a time, counted from the period that holds ``start``.
    The first and last windows are clipped to the range, so the windows cover it
    exactly, in order, with no gap and no overlap.

    Total over every valid input: a chunk reaching past the last representable day
    (9999-12-31) simply ends with the range, so nothing but :class:`PlanError` escapes.
    """
    validate_range(start, end)
    checked_unit = validate_unit(unit, size)
    step = _step(checked_unit, size)
    windows: list[Window] = []
    period = _period_start(start, checked_unit)
    while True:
        following = _next_period(period, step)
        last = end if following is None else min(following - timedelta(days=1), end)
        windows.append(Window(len(windows), max(period, start), last))
        if len(windows) > MAX_WINDOWS:
            raise PlanError(
                f"the range {start}..{end} makes more than {MAX_WINDOWS} {unit} chunks; use a larger chunk unit or size"
            )
        if following is None or following > end:
            return windows
        period = following


def _next_period(period: date, step: relativedelta) -> date | None:
    """The start of the period after ``period``, or None when it lies past ``date.max``."""
    try:
        return period + step
    except (OverflowError, ValueError):  # datetime raises the one, dateutil the other
        return None


def compress_indices(indices: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted, merged inclusive runs: ``[0, 1, 2, 5]`` -> ``[(0, 2), (5, 5)]``."""
    runs: list[tuple[int, int]] = []
    for i in sorted(set(indices)):
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def expand_runs(runs: Sequence[Sequence[int]]) -> set[int]:
    """Inverse of :func:`compress_indices`."""
    return {i for first, last in runs for i in range(first, last + 1)}


# --- tenant x window matrix ------------------------------------------------------------------

CellOrder = Literal["windowMajor", "tenantMajor"]
CELL_ORDERS: Final[tuple[str, ...]] = get_args(CellOrder)
# One object rebuilds every tenant of a platform; past this, split the tenants over backfills.
MAX_TENANTS: Final = 1000


@dataclass(frozen=True, order=True)
class Cell(Window):
    """One chunk of a matrix backfill: a window of one tenant (None: all tenants).

    ``index`` is the cell's position in the plan (what Job labels, audit ids and the status's
    index runs count); ``window_index`` is its window's position among the windows. A backfill
    with one tenant (or none) has one cell per window, with the same index as its window.
    """

    tenant: str | None = None
    window_index: int = 0


class CellPlan(Sequence[Cell]):
    """The cells of a tenant x window plan, made on demand: 1,000 tenants x 3,660 windows would
    otherwise be millions of objects held for the whole run."""

    def __init__(self, windows: Sequence[Window], tenants: Sequence[str | None], order: CellOrder) -> None:
        self.windows = tuple(windows)
        self.tenants = tuple(tenants)
        self.order = order

    def __len__(self) -> int:
        return len(self.windows) * len(self.tenants)

    def position(self, index: int) -> tuple[int, int]:
        """(tenant position, window index) of cell ``index``, by arithmetic alone."""
        if self.order == "windowMajor":
            w, t = divmod(index, len(self.tenants))
        else:
            t, w = divmod(index, len(self.windows))
        return t, self.windows[w].index

    @overload
    def __getitem__(self, index: int) -> Cell: ...
    @overload
    def __getitem__(self, index: slice) -> list[Cell]: ...
    def __getitem__(self, index: int | slice) -> Cell | list[Cell]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        size = len(self)
        if index < 0:
            index += size
        if not 0 <= index < size:
            raise IndexError(f"cell {index} is not in a plan of {size}")
        t, w = self.position(index)
        window = self.windows[w]
        return Cell(index, window.start, window.end, tenant=self.tenants[t], window_index=window.index)

    def __iter__(self) -> Iterator[Cell]:
        return (self[i] for i in range(len(self)))


def plan_cells(windows: Sequence[Window], tenants: Sequence[str | None], order: str = "windowMajor") -> CellPlan:
    """Every (tenant, window) cell exactly once, numbered in launch order.

    ``windowMajor`` runs every tenant of a window before the next window (a day is done for the
    whole platform early); ``tenantMajor`` runs all of one tenant's windows before the next
    tenant (each tenant is done as early as possible).
    """
    if order not in CELL_ORDERS:
        raise PlanError(f"order must be one of {', '.join(CELL_ORDERS)}, got {order!r}")
    if not tenants:
        raise PlanError("a backfill needs at least one tenant (None stands for all tenants)")
    return CellPlan(windows, tenants, order)  # type: ignore[arg-type]  # membership checked above
