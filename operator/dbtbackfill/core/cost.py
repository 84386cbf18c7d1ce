"""Cost before launch: the source rows each window reads, and an ETA from past runs.

The estimates are PostgreSQL's own: every model is compiled once with the window as ``$1``/``$2``
(as the contract check does), its generic plan names the scans the window filters, and
``EXPLAIN`` of the plan for each window's real dates gives the planner's row estimate of those
scans (from ``pg_class.reltuples`` and the column statistics, so ``ANALYZE`` keeps them honest).
Nothing is counted and nothing is written. The ETA is the mean duration per day of past
completed chunks of the same models, from the audit log.

Pure: :func:`dbtbackfill.runner.cost_estimate.window_estimates` reads the plans (on one read-only
connection) that these functions turn into a report.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Final

from dbtbackfill.core.planner import Window

Relation = tuple[str, str]  # (schema, table)
MAX_STATUS_WINDOWS: Final = 31  # the status summary lists the heaviest windows only
#: status.costEstimate's fields from the dry-run chunks' recorded estimates.
ESTIMATE_FIELDS: Final = ("estimatedSourceRows", "reportedCells", "largestCell", "settledCellsRead")


@dataclass(frozen=True)
class WindowCost:
    window: Window
    rows: Mapping[Relation, int]  # estimated rows of each windowed source the window reads

    @property
    def total(self) -> int:
        return sum(self.rows.values())


@dataclass(frozen=True)
class History:
    """Past completed chunks of the same models: how many, how many days, how long in all."""

    chunks: int = 0
    days: int = 0
    seconds: float = 0.0

    @property
    def seconds_per_day(self) -> float | None:
        return self.seconds / self.days if self.days else None


@dataclass(frozen=True)
class CostReport:
    windows: tuple[WindowCost, ...]
    history: History = field(default_factory=History)
    notes: tuple[str, ...] = ()

    @property
    def total_rows(self) -> int:
        return sum(w.total for w in self.windows)

    def eta_seconds(self, parallelism: int = 1, tenants: int = 1) -> float | None:
        """Days to run times the mean seconds per day of past chunks, spread over ``parallelism``."""
        per_day = self.history.seconds_per_day
        if per_day is None:
            return None
        days = sum(w.window.days for w in self.windows) * tenants
        return per_day * days / max(1, parallelism)

    def lines(self, parallelism: int = 1, tenants: int = 1) -> list[str]:
        """What ``--dry-run`` prints: one line per window, then the total and the ETA."""
        out = [f"  cost {w.window.label()}: reads ~{w.total:,} source row(s){_by_relation(w.rows)}"
               for w in self.windows]  # fmt: skip
        out.append(f"cost: ~{self.total_rows:,} source row(s) over {len(self.windows)} window(s) (planner estimates)")
        eta = self.eta_seconds(parallelism, tenants)
        if eta is None:
            out.append("eta: unknown: no completed chunk of these models in the audit log yet")
        else:
            out.append(
                f"eta: ~{eta:,.0f}s, from {self.history.chunks} past chunk(s) of these models "
                f"({self.history.seconds_per_day:.2f}s per day)"
            )
        out += [f"cost: note: {n}" for n in self.notes]
        return out

    def summary(self, parallelism: int = 1, tenants: int = 1) -> dict[str, Any]:
        """A bounded summary for a status: totals, the ETA, and the heaviest windows."""
        eta = self.eta_seconds(parallelism, tenants)
        heaviest = sorted(self.windows, key=lambda w: (-w.total, w.window.index))[:MAX_STATUS_WINDOWS]
        return {
            "estimatedSourceRows": self.total_rows,
            "estimatedSeconds": None if eta is None else round(eta, 1),
            "pastChunks": self.history.chunks,
            "heaviestWindows": [
                {"window": w.window.label(), "estimatedSourceRows": w.total}
                for w in sorted(heaviest, key=lambda w: w.window.index)
            ],
        }


@dataclass(frozen=True)
class CellEstimate:
    """One dry-run chunk's recorded estimate: its window (and tenant), the source rows it reads."""

    chunk_index: int
    tenant_id: str | None
    start_date: date
    end_date: date
    rows: int

    def label(self) -> str:
        return f"{self.start_date.isoformat()}..{self.end_date.isoformat()}"


def estimates_summary(reported: int, total: int, largest: CellEstimate | None) -> dict[str, Any]:
    """``status.costEstimate``'s share of the dry-run chunks' recorded estimates: the total
    source rows, how many cells reported one, and the largest cell. Its size does not grow with
    the plan (1,000 tenants x 365 days is as small as one cell)."""
    out: dict[str, Any] = {"estimatedSourceRows": total, "reportedCells": reported, "largestCell": None}
    if largest is not None:
        cell: dict[str, Any] = {"chunk": largest.chunk_index, "window": largest.label(),
                                "estimatedSourceRows": largest.rows}  # fmt: skip
        if largest.tenant_id is not None:
            cell["tenant"] = largest.tenant_id
        out["largestCell"] = cell
    return out


def _by_relation(rows: Mapping[Relation, int]) -> str:
    if not rows:
        return ""
    return " (" + ", ".join(f"{schema}.{table} ~{n:,}" for (schema, table), n in sorted(rows.items())) + ")"


def _nodes(node: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    yield node
    for child in node.get("Plans") or ():
        yield from _nodes(child)


Explain = Sequence[Mapping[str, Any]] | Mapping[str, Any]


def scan_rows(explain: Explain, relations: set[Relation]) -> dict[Relation, int]:
    """The planner's estimated rows of the scans of ``relations`` in ``EXPLAIN (FORMAT JSON)``.

    A relation scanned twice (a self-join) counts twice: the window reads its rows twice.
    """
    top = explain[0] if isinstance(explain, Sequence) else explain
    out: dict[Relation, int] = {}
    for node in _nodes(top["Plan"]):
        key = (str(node.get("Schema", "")), str(node.get("Relation Name", "")))
        if key in relations:
            out[key] = out.get(key, 0) + int(node.get("Plan Rows") or 0)
    return out


def merge_models(per_model: Sequence[Mapping[Relation, int]]) -> dict[Relation, int]:
    """One window's rows per source over its models: a source read by several models (a
    staging view inlined into each fact) holds the same rows, so the largest estimate counts."""
    out: dict[Relation, int] = {}
    for rows in per_model:
        for key, n in rows.items():
            out[key] = max(out.get(key, 0), n)
    return out
