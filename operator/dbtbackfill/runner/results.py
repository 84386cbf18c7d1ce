"""What dbt reports back: each model's result, a window's, a whole backfill's, and the error text.

Plain data and the functions that read dbt's result objects into it; nothing here calls dbt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dbtbackfill.core.planner import Window


@dataclass(frozen=True)
class ModelResult:
    name: str
    status: str
    rows_affected: int | None
    #: None when not measured per model (compiled windows run a window's models as one batch).
    seconds: float | None
    message: str | None


@dataclass(frozen=True)
class WindowResult:
    window: Window
    success: bool
    seconds: float
    models: tuple[ModelResult, ...] = ()
    error: str | None = None

    @property
    def rows(self) -> int:
        return sum(m.rows_affected or 0 for m in self.models)


@dataclass(frozen=True)
class BackfillOutcome:
    windows: tuple[WindowResult, ...]
    planned: int
    seconds: float
    #: The microbatch models' one dbt run over the whole range, when the others ran compiled.
    microbatch: WindowResult | None = None

    @property
    def success(self) -> bool:
        windows_ok = len(self.windows) == self.planned and all(w.success for w in self.windows)
        return windows_ok and (self.microbatch is None or self.microbatch.success)

    @property
    def rows(self) -> int:
        return sum(w.rows for w in self.windows) + (self.microbatch.rows if self.microbatch else 0)

    @property
    def error(self) -> str | None:
        for w in self.windows:
            if not w.success:
                return f"window {w.window.label()}: {w.error}"
        if self.microbatch is not None and not self.microbatch.success:
            return f"microbatch {self.microbatch.window.label()}: {self.microbatch.error}"
        return None


def node_label(node: Any) -> str:
    """A model's name as ``dbt ls --output name`` prints it: ``customers.v2`` for a versioned model."""
    version = getattr(node, "version", None)
    return f"{node.name}.v{version}" if version is not None else str(node.name)


def batch_rows(event: Any) -> tuple[str, int] | None:
    """``(model, rows)`` from dbt's event for one finished microbatch batch (``MERGE 12``)."""
    if event.info.name != "LogBatchResult":
        return None
    words = str(getattr(event.data, "status", "")).split()
    node = getattr(event.data, "node_info", None)
    name = getattr(node, "node_name", "") if node is not None else ""
    if not name or not words or not words[-1].isdigit():
        return None
    return name, int(words[-1])


def model_results(result: Any, batches: dict[str, int] | None = None) -> tuple[ModelResult, ...]:
    out: list[ModelResult] = []
    for r in getattr(result, "results", None) or ():
        response = r.adapter_response or {}
        rows = response.get("rows_affected")
        if r.node.name in (batches or {}):  # a microbatch model: the sum of its batches' rows
            rows = (batches or {})[r.node.name]
        out.append(
            ModelResult(
                name=node_label(r.node),
                status=str(r.status),
                rows_affected=int(rows) if isinstance(rows, int) and rows >= 0 else None,
                seconds=float(r.execution_time or 0.0),
                message=r.message,
            )
        )
    return tuple(out)


def error_text(res: Any, models: Sequence[ModelResult]) -> str:
    failed = [m for m in models if m.status in ("error", "fail", "runtime error")]
    if failed:
        return "; ".join(f"{m.name}: {m.message}" for m in failed)
    if res.exception is not None:
        return str(res.exception).strip()
    return "dbt reported failure without an error message"
