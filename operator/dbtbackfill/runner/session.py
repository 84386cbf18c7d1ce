"""Run dbt over backfill windows in-process, with the manifest parsed once.

Starting dbt costs far more than a window's SQL (about 2.5 s for a fresh ``dbt run``
against about 0.13 s for an in-process invocation that reuses a parsed manifest), so
a backfill parses the project once. Models that follow the backfill contract are then
compiled once and every window runs from that SQL (:mod:`dbtbackfill.runner.compiled`); other
selections run each window as one ``dbtRunner`` invocation on the parsed manifest.
Which project, profile and target dbt uses is decided by :mod:`dbtbackfill.runner.project`.

:class:`DbtSession` ties three parts together: the parsed manifest
(:mod:`dbtbackfill.runner.manifest`), the dbt invocations with their flags and environment
(:mod:`dbtbackfill.runner.invocation`), and what they report (:mod:`dbtbackfill.runner.results`).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from dbtbackfill.core.planner import Window
from dbtbackfill.runner.compile_once import CompileOnce
from dbtbackfill.runner.compiled import CompiledWindows, NotCompilable, TableMissing
from dbtbackfill.runner.invocation import DbtInvocation, RunnerError, connection_settings, session_environment
from dbtbackfill.runner.manifest import ProjectManifest, copy_manifest
from dbtbackfill.runner.project import ProjectError, Resolved, Target, find_project_dir, resolve
from dbtbackfill.runner.results import BackfillOutcome, ModelResult, WindowResult
from dbtbackfill.runner.window_tests import WindowTests

_BOOTSTRAP_LOCK_KEY: Final = 0x64627463  # "dbtc": first creation of the project's tables


@dataclass
class DbtSession:
    """One parsed dbt project, ready to run many windows without parsing again.

    Its parts: the parse (:class:`ProjectManifest`), the dbt invocations (:class:`DbtInvocation`)
    and the compiled engine's compile-once inputs (:class:`CompileOnce`).
    """

    database_url: str
    #: ``--project-dir``/``--profiles-dir``/``--target``; None: see :mod:`dbtbackfill.runner.project`.
    project_dir: Path | str | None = None
    profiles_dir: Path | str | None = None
    target: str | None = None
    threads: int | None = None
    target_path: Path | None = None
    log_path: Path | None = None
    quiet: bool = True
    base_target: Path = field(init=False)
    resolved: Resolved = field(init=False)
    manifest: ProjectManifest = field(init=False)
    dbt: DbtInvocation = field(init=False)
    compile_once: CompileOnce = field(init=False)
    _bootstrapped: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        try:
            project_dir = find_project_dir(str(self.project_dir) if self.project_dir else None, os.environ, Path.cwd())
        except ProjectError as exc:
            raise RunnerError(str(exc)) from None
        self.project_dir = project_dir
        self.manifest = ProjectManifest.private_to_process(self.target_path, project_dir)
        self.base_target, self.target_path = self.manifest.base_target, self.manifest.target_path
        self.log_path = log_path = Path(self.log_path or os.environ.get("DBT_LOG_PATH") or project_dir / "logs")
        env, libpq_env = session_environment(self.database_url)
        try:
            self.resolved = resolve(
                project_dir=str(project_dir),
                profiles_dir=str(self.profiles_dir) if self.profiles_dir else None,
                target=self.target,
                generated_dir=self.manifest.target_path / "profile",
            )
        except ProjectError as exc:
            self.close()
            raise RunnerError(str(exc)) from None
        paths, resolved = (project_dir, self.resolved.profiles_dir, self.manifest.target_path, log_path), self.resolved
        self.dbt = DbtInvocation(*paths, resolved.target_name, self.threads, self.quiet, env, libpq_env)
        self.manifest.seed(self.resolved.project.directory)
        self.compile_once = CompileOnce(self.manifest, self.dbt)

    @property
    def parse_report(self) -> str:
        """How the last parse() went, for the user: "reused the saved parse" or why it could not."""
        return self.manifest.report

    def connect_args(self) -> dict[str, str]:
        """psycopg keyword arguments for the connection dbt's target makes: the profile's fields, and the
        URL's other parameters (dbt's own connections get them from libpq's environment); the profile wins."""
        return {**connection_settings(self.database_url).beyond_profile(), **self.data_target.connect}

    @property
    def data_target(self) -> Target:
        """Where dbt writes: the resolved profile target (not necessarily DATABASE_URL's database)."""
        return self.resolved.target

    def close(self) -> None:
        """Remove this process's private target dir."""
        if self.target_path is not None and self.target_path.parent == self.base_target:
            shutil.rmtree(self.target_path, ignore_errors=True)

    def parse(self) -> None:
        """Parse the project once (see :meth:`ProjectManifest.parse`)."""
        self.manifest.parse(self.dbt)

    def _copy(self) -> Any:  # dbt mutates what it compiles: each invocation gets its own copy
        return copy_manifest(self.manifest.require())

    def select_models(self, selectors: Sequence[str]) -> list[str]:
        """The models a selection matches; an empty match is an error, not a no-op."""
        return self.dbt.select_models(self._copy(), selectors)

    def microbatch_models(self, models: Sequence[str]) -> list[str]:
        """Those of ``models`` dbt runs as microbatch (``incremental_strategy='microbatch'``)."""
        return self.manifest.microbatch_models(models)

    def reader_of(self, models: Sequence[str], sources: Sequence[str]) -> tuple[str, str] | None:
        """``(model, source)``: one of ``models`` that reads one of ``sources``, directly or not."""
        return self.manifest.reader_of(models, sources)

    def compile(self, window: Window, tenant_id: str | None, selectors: Sequence[str]) -> WindowResult:
        """Render every selected model for one window, touching no data."""
        return self.dbt.window("compile", self._copy, window, tenant_id, selectors)

    def run_window(
        self, window: Window, tenant_id: str | None, selectors: Sequence[str], *, event_time: bool = False
    ) -> WindowResult:
        """One dbt run of ``selectors`` for ``window``; ``event_time`` bounds microbatch models by it."""
        if self._bootstrapped:
            return self.dbt.window("run", self._copy, window, tenant_id, selectors, event_time=event_time)
        # The first run against a database creates the fact tables. Parallel chunks would race
        # to create the same table (and all but one would fail), so until every table exists,
        # runs take turns under a database-wide advisory lock.
        with _bootstrap_lock(self.connect_args(), self.manifest.relations()) as missing:
            result = self.dbt.window("run", self._copy, window, tenant_id, selectors, event_time=event_time)
        self._bootstrapped = result.success or not missing
        return result

    def compiled_windows(
        self, tenant_id: str | None, models: Sequence[str], verify: WindowTests | None = None
    ) -> CompiledWindows:
        """Compile ``models`` once for every window and prepare their statements (:meth:`CompileOnce.windows`)."""
        return self.compile_once.windows(self.connect_args(), tenant_id, models, verify)

    def compile_params(self, tenant_id: str | None, models: Sequence[str]) -> list[Any]:
        """The ``models``' dbt nodes compiled once, with the window as ``$1``/``$2`` (:meth:`CompileOnce.params`)."""
        return self.compile_once.params(tenant_id, models)

    def window_tests(self, tenant_id: str | None, models: Sequence[str]) -> WindowTests:
        """The data tests attached to ``models``, compiled once (:meth:`CompileOnce.tests`)."""
        return self.compile_once.tests(self.connect_args(), tenant_id, models)


@contextmanager
def _bootstrap_lock(connect: dict[str, str], relations: list[tuple[str, str]]) -> Iterator[bool]:
    """Yields whether a table of ``relations`` was missing; if one was, holds the bootstrap lock."""
    import psycopg
    from psycopg.conninfo import make_conninfo

    schemas = [schema for schema, _ in relations]
    tables = [table for _, table in relations]
    # The target's database: where dbt creates the tables (and parallel chunks would race).
    with psycopg.connect(make_conninfo(**connect), autocommit=True) as conn:

        def missing() -> bool:
            row = conn.execute(
                "select count(*) from unnest(%s::text[], %s::text[]) as r(s, t)"
                " where exists (select 1 from pg_tables where schemaname = r.s and tablename = r.t)",
                (schemas, tables),
            ).fetchone()
            return bool(relations) and (row[0] if row else 0) < len(relations)

        if not missing():
            yield False
            return
        conn.execute("select pg_advisory_lock(%s)", (_BOOTSTRAP_LOCK_KEY,))
        try:
            yield missing()
        finally:
            conn.execute("select pg_advisory_unlock(%s)", (_BOOTSTRAP_LOCK_KEY,))


def run_windows(
    session: DbtSession,
    windows: Sequence[Window],
    *,
    tenant_id: str | None,
    selectors: Sequence[str],
    models: Sequence[str] = (),
    engine: str = "auto",
    on_engine: Callable[[str], None] = lambda _: None,
    on_window: Callable[[WindowResult], None] = lambda _: None,
    on_microbatch: Callable[[WindowResult], None] = lambda _: None,
    verify: WindowTests | None = None,
) -> BackfillOutcome:
    """Run windows in calendar order; stop at the first failure.

    With ``engine="auto"`` and models that follow the backfill contract, dbt compiles them
    once and every window runs from that SQL (:mod:`dbtbackfill.runner.compiled`); otherwise, or
    with ``engine="dbt"``, each window is one in-process dbt invocation. A table that does not
    exist yet is created by dbt in the first window, then the rest run compiled.
    ``on_engine`` hears which one runs, and why when it is dbt.

    Microbatch models (``incremental_strategy='microbatch'``) always run through dbt, bounded by
    ``--event-time-start``/``--event-time-end``: in each window's dbt run, or, when the other
    models run compiled, in one dbt run over the whole range after the windows, which dbt splits
    into the models' own batches (``on_microbatch`` hears it). When a compiled model would read
    a microbatch model, every window is one dbt run instead, so dbt keeps them in order.

    ``verify`` (``--verify``) tests each window's rows before the window counts as done: the
    compiled engine runs the tests inside the window's transaction (a failure rolls it back),
    the dbt engine right after dbt committed it (a failure marks the window failed).

    Later windows are not attempted once one fails: a backfill is retried as a whole
    or per chunk, and running past a failure would leave gaps that look like success.
    """
    started = time.monotonic()
    done: list[WindowResult] = []
    pending = list(windows)
    compiled: CompiledWindows | None = None
    micro = session.microbatch_models(models)
    others = [m for m in models if m not in micro]
    event_time = bool(micro)

    def outcome(batched: WindowResult | None = None) -> BackfillOutcome:
        return BackfillOutcome(tuple(done), len(windows), time.monotonic() - started, batched)

    try:
        reader = session.reader_of(others, micro)
        if engine == "auto" and others and reader is None:
            compiled, reason = _try_compiled(session, tenant_id, others, verify)
            if compiled is None and isinstance(reason, TableMissing) and len(pending) > 1:
                on_engine(f"dbt for the first window: {reason}")
                first = _run_dbt(session, pending.pop(0), tenant_id, selectors, verify, event_time=event_time)
                done.append(first)
                on_window(first)
                if not first.success:
                    return outcome()
                compiled, reason = _try_compiled(session, tenant_id, others, verify)
        elif engine == "dbt":
            reason = NotCompilable("--engine dbt")
        elif reader is not None:
            reason = NotCompilable(f"model {reader[0]} reads microbatch model {reader[1]}")
        else:
            reason = NotCompilable("only microbatch models selected" if models else "no models selected")
        if compiled is not None:
            text = f"compiled: dbt compiled {len(compiled.models)} model(s) once; one transaction per window"
            if micro:
                text += f"; then dbt runs microbatch {', '.join(micro)} once over the range, batch by batch"
            on_engine(text)
        else:
            on_engine(f"dbt per window: {reason}")
        for window in pending:
            if compiled is not None:
                result = _run_compiled(compiled, window)
            else:
                result = _run_dbt(session, window, tenant_id, selectors, verify, event_time=event_time)
            done.append(result)
            on_window(result)
            if not result.success:
                return outcome()
        if compiled is not None and micro and pending:
            span = Window(pending[0].index, pending[0].start, pending[-1].end)
            batched = session.run_window(span, tenant_id, micro, event_time=True)
            on_microbatch(batched)
            return outcome(batched)
    finally:
        if compiled is not None:
            compiled.close()
    return outcome()


def describe_engine(
    session: DbtSession, tenant_id: str | None, models: Sequence[str], engine: str = "auto", windows: int = 1
) -> str:
    """Which engine :func:`run_windows` would use for ``windows`` windows, and why; writes nothing."""
    if engine != "auto" or not models:
        return f"dbt per window: {'--engine dbt' if engine == 'dbt' else 'no models selected'}"
    micro = session.microbatch_models(models)
    others = [m for m in models if m not in micro]
    if not others:
        return "dbt per window: only microbatch models selected"
    reader = session.reader_of(others, micro)
    if reader is not None:
        return f"dbt per window: model {reader[0]} reads microbatch model {reader[1]}"
    compiled, reason = _try_compiled(session, tenant_id, others)
    if compiled is not None:
        compiled.close()
        text = f"compiled: dbt would compile {len(compiled.models)} model(s) once; one transaction per window"
        return text + (f"; then dbt runs microbatch {', '.join(micro)} once over the range" if micro else "")
    if isinstance(reason, TableMissing) and windows > 1:
        return f"dbt for the first window ({reason}), then compiled if the contract holds"
    return f"dbt per window: {reason}"


def _run_dbt(
    session: DbtSession,
    window: Window,
    tenant_id: str | None,
    selectors: Sequence[str],
    verify: WindowTests | None,
    *,
    event_time: bool = False,
) -> WindowResult:
    result = session.run_window(window, tenant_id, selectors, event_time=event_time)
    if not result.success or verify is None:
        return result
    failed = verify.after_window(window.start, window.end)
    if failed is None:
        return result
    return replace(result, success=False, error=f"{failed} (dbt had committed the window)")


def _try_compiled(
    session: DbtSession, tenant_id: str | None, models: Sequence[str], verify: WindowTests | None = None
) -> tuple[CompiledWindows | None, NotCompilable | None]:
    try:
        return session.compiled_windows(tenant_id, models, verify), None
    except NotCompilable as e:
        return None, e


def _run_compiled(compiled: CompiledWindows, window: Window) -> WindowResult:
    started = time.monotonic()
    rows, error = compiled.run(window.start, window.end)
    seconds = time.monotonic() - started
    results = tuple(ModelResult(name, "success", n, None, None) for name, n in rows)
    return WindowResult(window, error is None, seconds, results, error)
