"""What a person sees while a backfill runs: the plan, a progress bar or log lines, a summary.

On a terminal it draws a rich progress bar; anywhere else (a Job's log, CI) it prints
one plain line per window, since bars turn into noise in log collectors.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from rich.table import Table

from dbtbackfill.core.planner import Window

if TYPE_CHECKING:
    from dbtbackfill.core.audit import BackfillExecution
    from dbtbackfill.core.cost import CostReport
    from dbtbackfill.runner.project import Target
    from dbtbackfill.runner.results import BackfillOutcome, WindowResult


class Reporter:
    def __init__(
        self,
        windows: Sequence[Window],
        *,
        models: Sequence[str],
        tenant: str | None,
        dry_run: bool = False,
        stream: TextIO | None = None,
    ) -> None:
        self.windows = windows
        self.models = models
        self.tenant = tenant
        self.dry_run = dry_run
        self.stream = stream or sys.stderr
        self.console = Console(file=self.stream, highlight=False, soft_wrap=True)
        self.interactive = self.stream.isatty()
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._done = 0

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def plan(self) -> None:
        first, last = self.windows[0], self.windows[-1]
        scope = f"tenant {self.tenant}" if self.tenant else "all tenants"
        self._line(
            f"plan: {len(self.windows)} window(s) {first.start}..{last.end}, {scope}, "
            f"{len(self.models)} model(s): {', '.join(self.models)}"
        )
        if self.dry_run:
            for w in self.windows:
                self._line(f"  window {w.index + 1}: {w.label()} ({w.days} day(s))")

    def cost(self, report: CostReport) -> None:
        """A dry run's cost before launch: source rows per window, their total, and the ETA."""
        for line in report.lines():
            self._line(line)

    def target(self, target: Target, audit: str | None) -> None:
        """Where the data goes; ``audit`` names the audit database when it is another one."""
        self._line(f"target: {target.describe()}")
        if audit is not None:
            self._line(f"audit: rows go to {audit} (DATABASE_URL), not to the target's database")

    def parsed(self, text: str) -> None:
        """How dbt's parse went: reused the saved one (the image's), or parsed in full and why."""
        if text:
            self._line(f"parse: {text}")

    def engine(self, text: str) -> None:
        """How the windows run: compiled once, or one dbt invocation each (and why)."""
        if self._progress is not None:
            self._progress.console.print(f"engine: {text}")
        else:
            self._line(f"engine: {text}")

    @contextmanager
    def running(self) -> Iterator[None]:
        if not self.interactive:
            yield
            return
        with Progress(
            TextColumn("[bold]backfill"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.description}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        ) as progress:
            self._progress = progress
            self._task = progress.add_task("", total=len(self.windows))
            try:
                yield
            finally:
                self._progress = None

    def window_done(self, result: WindowResult) -> None:
        self._done += 1
        status = "ok" if result.success else "FAILED"
        text = (
            f"window {self._done}/{len(self.windows)} {result.window.label()} {status} "
            f"rows={result.rows} {result.seconds:.2f}s"
        )
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=1, description=result.window.label())
            if not result.success:
                self._progress.console.print(text)
        else:
            self._line(text)
        if not result.success:
            self._line(f"error: {result.error}")

    def microbatch_done(self, result: WindowResult) -> None:
        """The microbatch models' one dbt run over the range, after the compiled windows."""
        status = "ok" if result.success else "FAILED"
        self._line(f"microbatch {result.window.label()} {status} rows={result.rows} {result.seconds:.2f}s")
        if not result.success:
            self._line(f"error: {result.error}")

    def dry_run_done(self, result: WindowResult) -> None:
        if result.success:
            compiled = sum(1 for m in result.models if m.name in self.models)
            self._line(f"dry run: {compiled} model(s) compiled for {result.window.label()}; nothing written")
        else:
            self._line(f"dry run: compilation failed: {result.error}")

    def summary(self, outcome: BackfillOutcome, execution_id: uuid.UUID) -> None:
        verdict = "completed" if outcome.success else "FAILED"
        skipped = outcome.planned - len(outcome.windows)
        tail = f", {skipped} window(s) not attempted" if skipped else ""
        self._line(
            f"backfill {verdict}: {len(outcome.windows)}/{outcome.planned} window(s){tail}, "
            f"{outcome.rows} row(s), {outcome.seconds:.1f}s (execution {execution_id})"
        )

    def cancelled(self, message: str, execution_id: uuid.UUID) -> None:
        self._line(f"backfill cancelled: {message} (execution {execution_id})")


def print_history(rows: Sequence[BackfillExecution], stream: TextIO | None = None) -> None:
    console = Console(file=stream or sys.stdout, highlight=False, width=160)
    table = Table(title="backfill_executions (newest first)")
    for col in (
        "id",
        "kind",
        "tenant",
        "start",
        "end",
        "status",
        "seconds",
        "records",
        "created_at",
        "error",
    ):
        table.add_column(col, overflow="fold", no_wrap=col == "id", min_width=36 if col == "id" else None)
    for r in rows:
        table.add_row(
            str(r.id),
            r.kind,
            r.tenant_id or "*",
            str(r.start_date),
            str(r.end_date),
            r.effective_status,
            f"{r.duration_seconds:.2f}" if r.duration_seconds is not None else "",
            str(r.records_processed) if r.records_processed is not None else "",
            r.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            (r.error_message or "")[:80],
        )
    console.print(table)
