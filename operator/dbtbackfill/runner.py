"""Run dbt over backfill windows in-process, with the manifest parsed once.

Starting dbt costs far more than a window's SQL (about 2.5 s for a fresh ``dbt run``
against about 0.13 s for an in-process invocation that reuses a parsed manifest), so
a backfill parses the project once. Models that follow the backfill contract are then
compiled once and every window runs from that SQL (:mod:`dbtbackfill.compiled`); other
selections run each window as one ``dbtRunner`` invocation on the parsed manifest.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from sqlalchemy.engine import make_url

from dbtbackfill.compiled import (
    CompiledWindows,
    Hook,
    ModelNode,
    NotCompilable,
    TableMissing,
    compiled_vars,
    plan_models,
)
from dbtbackfill.parse_key import parse_environment, project_connection_reads
from dbtbackfill.planner import Window

DEFAULT_SCHEMA: Final = "analytics"
_BOOTSTRAP_LOCK_KEY: Final = 0x64627463  # "dbtc": first creation of the project's tables


class RunnerError(RuntimeError):
    """dbt could not be set up for this backfill (bad selection, broken project, ...)."""


def default_project_dir() -> Path:
    """``$DBT_PROJECT_DIR``, else ``analytics/`` at the repository or image root."""
    env = os.environ.get("DBT_PROJECT_DIR")
    if env:
        return Path(env)
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (root / "analytics" / "dbt_project.yml").exists():
            return root / "analytics"
    return Path.cwd() / "analytics"


# Files whose Jinja a parse renders (packages included); target/ and logs/ are dbt's output.
_PARSED_SUFFIXES: Final = frozenset({".sql", ".yml", ".yaml", ".md"})
_NOT_PARSED_DIRS: Final = frozenset({"target", "logs"})


def _project_sources(project_dir: Path) -> Iterator[tuple[str, str]]:
    for path in sorted(project_dir.rglob("*")):
        relative = path.relative_to(project_dir)
        if relative.parts[0] in _NOT_PARSED_DIRS or path.suffix not in _PARSED_SUFFIXES or not path.is_file():
            continue
        if relative.as_posix() == "profiles.yml":  # where the credentials come in, not project Jinja
            continue
        yield relative.as_posix(), path.read_text(errors="replace")


@contextmanager
def _environment(overrides: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``overrides`` applied, restored afterwards."""
    saved = {key: os.environ.get(key) for key in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def dbt_env(database_url: str, schema: str | None = None) -> dict[str, str]:
    """The ``DBT_PG_*`` variables ``profiles.yml`` reads, derived from one URL.

    Users give a single ``DATABASE_URL``; splitting it here keeps credentials out of
    every file and out of dbt's command line.
    """
    try:
        url = make_url(database_url)
    except Exception:
        raise RunnerError("database URL is not a valid URL (expected postgresql://user:pass@host:port/db)") from None
    if not url.drivername.startswith("postgres"):
        raise RunnerError(f"database URL must be a postgresql:// URL, got {url.drivername}://")
    if not url.host or not url.database:
        raise RunnerError("database URL must name a host and a database: postgresql://user@host:5432/db")
    return {
        "DBT_PG_HOST": url.host,
        "DBT_PG_PORT": str(url.port or 5432),
        "DBT_PG_USER": url.username or "postgres",
        "DBT_PG_PASSWORD": url.password or "",
        "DBT_PG_DBNAME": url.database,
        "DBT_PG_SCHEMA": schema or os.environ.get("DBT_PG_SCHEMA") or DEFAULT_SCHEMA,
    }


_PRISTINE_BEHAVIOR_FLAGS: list[Any] | None = None


def _reset_adapter_behavior_flags() -> None:
    """Undo dbt-adapters' per-adapter growth of a module-level list (dbt-labs/dbt-adapters#2136).

    Every adapter dbt creates appends its behavior flags to ``DEFAULT_BASE_BEHAVIOR_FLAGS``, so
    window n of an in-process backfill builds n+4 flags (each calling ``inspect.stack()``): per
    window time grows with the window count. Restoring the list before each invocation keeps
    it flat; the flags each new adapter builds are unchanged.
    """
    global _PRISTINE_BEHAVIOR_FLAGS  # captured once, before the first adapter
    try:
        from dbt.adapters.base import impl
    except ImportError:  # a dbt-adapters without that list has nothing to undo
        return
    flags = getattr(impl, "DEFAULT_BASE_BEHAVIOR_FLAGS", None)
    if not isinstance(flags, list):
        return
    if _PRISTINE_BEHAVIOR_FLAGS is None:
        _PRISTINE_BEHAVIOR_FLAGS = list(flags)
    flags[:] = _PRISTINE_BEHAVIOR_FLAGS


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


def window_vars(window: Window, tenant_id: str | None) -> dict[str, Any]:
    return {
        "backfill_start_date": window.start.isoformat(),
        "backfill_end_date": window.end.isoformat(),
        "tenant_id": tenant_id,
    }


def psycopg_connect_args(database_url: str) -> dict[str, str]:
    """psycopg keyword arguments for the same server, database and role dbt connects with."""
    env = dbt_env(database_url)
    return {
        "host": env["DBT_PG_HOST"],
        "port": env["DBT_PG_PORT"],
        "user": env["DBT_PG_USER"],
        "password": env["DBT_PG_PASSWORD"],
        "dbname": env["DBT_PG_DBNAME"],
        "connect_timeout": "10",  # as profiles.yml
    }


def model_node(node: Any, nodes: Any) -> ModelNode:
    """The parts of a compiled dbt model node :mod:`dbtbackfill.compiled` plans with.

    ``depends_on`` looks through ephemeral models (dbt inlines them) to the models they read.
    """
    reads: set[str] = set()
    pending = list(node.depends_on.nodes)
    while pending:
        uid = pending.pop()
        dep = nodes.get(uid)
        if dep is not None and dep.resource_type == "model" and dep.config.materialized == "ephemeral":
            pending.extend(dep.depends_on.nodes)
        else:
            reads.add(uid)
    config = node.config
    key = config.unique_key
    return ModelNode(
        unique_id=node.unique_id,
        name=node.name,
        materialized=str(config.materialized),
        compiled_code=node.compiled_code or "",
        relation_name=node.relation_name,
        schema=node.schema,
        table=node.alias,
        incremental_strategy=config.incremental_strategy,
        unique_key=(key,) if isinstance(key, str) else tuple(key or ()),
        pre_hooks=tuple(Hook(h.sql, h.transaction) for h in config.pre_hook),
        post_hooks=tuple(Hook(h.sql, h.transaction) for h in config.post_hook),
        incremental_predicates=tuple(config.get("incremental_predicates") or ()),
        grants=bool(config.grants),
        persist_docs=bool(config.persist_docs),
        depends_on=tuple(sorted(reads)),
    )


def _model_results(result: Any) -> tuple[ModelResult, ...]:
    out: list[ModelResult] = []
    for r in getattr(result, "results", None) or ():
        response = r.adapter_response or {}
        rows = response.get("rows_affected")
        out.append(
            ModelResult(
                name=r.node.name,
                status=str(r.status),
                rows_affected=int(rows) if isinstance(rows, int) and rows >= 0 else None,
                seconds=float(r.execution_time or 0.0),
                message=r.message,
            )
        )
    return tuple(out)


def _error_text(res: Any, models: Sequence[ModelResult]) -> str:
    failed = [m for m in models if m.status in ("error", "fail", "runtime error")]
    if failed:
        return "; ".join(f"{m.name}: {m.message}" for m in failed)
    if res.exception is not None:
        return str(res.exception).strip()
    return "dbt reported failure without an error message"


@dataclass
class DbtSession:
    """One parsed dbt project, ready to run many windows without parsing again."""

    database_url: str
    project_dir: Path = field(default_factory=default_project_dir)
    threads: int | None = None
    target_path: Path | None = None
    log_path: Path | None = None
    quiet: bool = True
    _manifest: Any = None
    _bootstrapped: bool = False
    base_target: Path = field(init=False)
    # How the last parse() went, for the user: "reused the saved parse" or why it could not.
    parse_report: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self.project_dir = Path(self.project_dir).resolve()
        if not (self.project_dir / "dbt_project.yml").exists():
            raise RunnerError(f"no dbt project at {self.project_dir} (set DBT_PROJECT_DIR)")
        env_target = os.environ.get("DBT_TARGET_PATH")
        env_logs = os.environ.get("DBT_LOG_PATH")
        self.base_target = Path(self.target_path or env_target or self.project_dir / "target")
        # A private target dir per process: concurrent backfills (parallel chunks on one
        # node, two users on one checkout) would otherwise overwrite each other's manifest.
        self.base_target.mkdir(parents=True, exist_ok=True)
        self.target_path = Path(tempfile.mkdtemp(prefix=".run-", dir=self.base_target))
        self.log_path = Path(self.log_path or env_logs or self.project_dir / "logs")
        os.environ.update(dbt_env(self.database_url))
        # No usage pings: our machines, and many users', have no route to dbt's tracker.
        os.environ.setdefault("DBT_SEND_ANONYMOUS_USAGE_STATS", "false")
        os.environ.setdefault("DO_NOT_TRACK", "1")
        self._seed_partial_parse()

    def _seed_partial_parse(self) -> None:
        """Start from the last parse saved in the shared target dir (or the image's)."""
        assert self.target_path is not None
        for candidate in (self.base_target, self.project_dir / "target"):
            saved = candidate / "partial_parse.msgpack"
            if saved.exists():
                shutil.copy2(saved, self.target_path / "partial_parse.msgpack")
                return

    def _save_partial_parse(self) -> None:
        assert self.target_path is not None
        fresh = self.target_path / "partial_parse.msgpack"
        if fresh.exists():
            staged = self.base_target / f".partial_parse.{os.getpid()}"
            shutil.copy2(fresh, staged)
            staged.replace(self.base_target / "partial_parse.msgpack")  # atomic for readers

    def close(self) -> None:
        """Remove this process's private target dir."""
        if self.target_path is not None and self.target_path.parent == self.base_target:
            shutil.rmtree(self.target_path, ignore_errors=True)

    def _common_args(self) -> list[str]:
        args = [
            "--project-dir",
            str(self.project_dir),
            "--profiles-dir",
            os.environ.get("DBT_PROFILES_DIR", str(self.project_dir)),
            "--target-path",
            str(self.target_path),
            "--log-path",
            str(self.log_path),
        ]
        return args

    def _global_args(self) -> list[str]:
        # dbt's file log duplicates what we print, and in-process runs leak its handle.
        base = ["--no-use-colors", "--log-level-file", "none"]
        return ["--quiet", *base] if self.quiet else base

    def _invoke(self, command: str, *args: str) -> Any:
        from dbt.cli.main import dbtRunner

        _reset_adapter_behavior_flags()
        if self._manifest is None:
            raise RunnerError("call parse() first")
        # dbt mutates the manifest while compiling (ephemeral models get their CTEs injected
        # and flagged as done), so a reused manifest breaks the next window's SQL. Each
        # invocation gets a fresh copy of the parsed one: far cheaper than parsing again.
        runner = dbtRunner(manifest=self._manifest.deepcopy())
        return runner.invoke([*self._global_args(), command, *self._common_args(), *args])

    def parse(self) -> None:
        """Parse the project, reusing the saved parse (the image's, or the last run's) when dbt allows.

        The parse sees placeholder host/port/user/password (:mod:`dbtbackfill.parse_key`), so a
        parse saved for other credentials but the same database and schema is reused; the
        real credentials are back in the environment before anything connects.
        """
        from dbt.cli.main import dbtRunner

        _reset_adapter_behavior_flags()  # snapshots the list before dbt's first adapter
        reads = project_connection_reads(_project_sources(self.project_dir))
        overrides = parse_environment(os.environ, reads)
        reasons: list[str] = []

        def on_event(event: Any) -> None:
            if event.info.name == "UnableToPartialParse":
                reasons.append(str(event.data.reason))

        started = time.monotonic()
        with _environment(overrides):
            res = dbtRunner(callbacks=[on_event]).invoke([*self._global_args(), "parse", *self._common_args()])
        if not res.success or res.result is None:
            raise RunnerError(f"dbt could not parse the project: {res.exception or 'see dbt logs'}")
        seconds = time.monotonic() - started
        if reasons:
            self.parse_report = f"full parse in {seconds:.2f}s: dbt could not reuse the saved one ({reasons[-1]})"
        else:
            self.parse_report = f"reused the saved parse ({seconds:.2f}s)"
        if reads:
            first = sorted(reads)[0]
            self.parse_report += f"; keyed on the credentials because {first} reads {', '.join(sorted(reads[first]))}"
        self._manifest = res.result
        self._save_partial_parse()

    def select_models(self, selectors: Sequence[str]) -> list[str]:
        """The models a selection matches; an empty match is an error, not a no-op."""
        # dbt prints ls results even with --quiet; they are for us, not the user.
        args = ["--resource-type", "model", "--output", "name", "--log-level", "none"]
        if selectors:
            args += ["--select", *selectors]
        res = self._invoke("ls", *args)
        if not res.success:
            raise RunnerError(f"invalid model selection {' '.join(selectors)!r}: {res.exception}")
        names = sorted(str(n) for n in (res.result or []))
        if not names:
            raise RunnerError(f"selection matched no models: {' '.join(selectors) or '(all)'}")
        return names

    def _window_args(self, window: Window, tenant_id: str | None, selectors: Sequence[str]) -> list[str]:
        args = ["--vars", json.dumps(window_vars(window, tenant_id))]
        if selectors:
            args += ["--select", *selectors]
        if self.threads:
            args += ["--threads", str(self.threads)]
        return args

    def compile(self, window: Window, tenant_id: str | None, selectors: Sequence[str]) -> WindowResult:
        """Render every selected model for one window, touching no data."""
        return self._execute("compile", window, tenant_id, selectors)

    def run_window(self, window: Window, tenant_id: str | None, selectors: Sequence[str]) -> WindowResult:
        if self._bootstrapped:
            return self._execute("run", window, tenant_id, selectors)
        # The first run against a database creates the fact tables. Parallel chunks would race
        # to create the same table (and all but one would fail), so until every table exists,
        # runs take turns under a database-wide advisory lock.
        with self._bootstrap_lock() as missing:
            result = self._execute("run", window, tenant_id, selectors)
        self._bootstrapped = result.success or not missing
        return result

    def compiled_windows(self, tenant_id: str | None, models: Sequence[str]) -> CompiledWindows:
        """Compile ``models`` once for every window and prepare their statements.

        Raises :class:`NotCompilable` (with the reason) when a model is outside the backfill
        contract, a table does not exist yet, or a schema changed: those windows need dbt itself.
        """
        if self._manifest is None:
            raise RunnerError("call parse() first")
        hooks = [n.name for n in self._manifest.nodes.values() if n.resource_type == "operation"]
        if hooks:
            raise NotCompilable(f"the project has on-run-start/on-run-end hooks ({', '.join(sorted(hooks))})")
        # dbt compile prints the SQL of selected nodes even with --quiet; it is for us, not the user.
        args = ["--vars", json.dumps(compiled_vars(tenant_id)), "--select", *models, "--no-write-json"]
        args += ["--log-level", "none"]
        res = self._invoke("compile", *args)
        if not res.success:
            raise NotCompilable(f"dbt could not compile the models once for all windows: {_error_text(res, [])}")
        nodes = [
            model_node(r.node, self._manifest.nodes)
            for r in res.result.results
            if r.node.resource_type == "model" and r.node.name in models
        ]
        return CompiledWindows.open(psycopg_connect_args(self.database_url), plan_models(nodes), tenant_id)

    def _relations(self) -> list[tuple[str, str]]:
        nodes = self._manifest.nodes.values() if self._manifest is not None else ()
        return [
            (n.schema, n.alias)
            for n in nodes
            if n.resource_type == "model" and n.config.materialized not in ("ephemeral", "view")
        ]

    @contextmanager
    def _bootstrap_lock(self) -> Iterator[bool]:
        import sqlalchemy as sa

        from dbtbackfill.audit import engine_for

        relations = self._relations()
        with engine_for(self.database_url).connect() as conn:

            def missing() -> bool:
                tables = sa.table("pg_tables", sa.column("schemaname"), sa.column("tablename"))
                query = (
                    sa.select(sa.func.count())
                    .select_from(tables)
                    .where(sa.tuple_(tables.c.schemaname, tables.c.tablename).in_(relations))
                )
                found: int = conn.execute(query).scalar_one()
                conn.commit()
                return bool(relations) and found < len(relations)

            if not missing():
                yield False
                return
            conn.execute(sa.select(sa.func.pg_advisory_lock(_BOOTSTRAP_LOCK_KEY)))
            conn.commit()
            try:
                yield missing()
            finally:
                conn.execute(sa.select(sa.func.pg_advisory_unlock(_BOOTSTRAP_LOCK_KEY)))
                conn.commit()

    def _execute(self, command: str, window: Window, tenant_id: str | None, selectors: Sequence[str]) -> WindowResult:
        started = time.monotonic()
        extra = ["--no-write-json"] if command == "run" else []
        res = self._invoke(command, *self._window_args(window, tenant_id, selectors), *extra)
        models = _model_results(res.result)
        seconds = time.monotonic() - started
        if res.success:
            return WindowResult(window, True, seconds, models)
        return WindowResult(window, False, seconds, models, _error_text(res, models))


@dataclass(frozen=True)
class BackfillOutcome:
    windows: tuple[WindowResult, ...]
    planned: int
    seconds: float

    @property
    def success(self) -> bool:
        return len(self.windows) == self.planned and all(w.success for w in self.windows)

    @property
    def rows(self) -> int:
        return sum(w.rows for w in self.windows)

    @property
    def error(self) -> str | None:
        for w in self.windows:
            if not w.success:
                return f"window {w.window.label()}: {w.error}"
        return None


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
) -> BackfillOutcome:
    """Run windows in calendar order; stop at the first failure.

    With ``engine="auto"`` and models that follow the backfill contract, dbt compiles them
    once and every window runs from that SQL (:mod:`dbtbackfill.compiled`); otherwise, or
    with ``engine="dbt"``, each window is one in-process dbt invocation. A table that does not
    exist yet is created by dbt in the first window, then the rest run compiled.
    ``on_engine`` hears which one runs, and why when it is dbt.

    Later windows are not attempted once one fails: a backfill is retried as a whole
    or per chunk, and running past a failure would leave gaps that look like success.
    """
    started = time.monotonic()
    done: list[WindowResult] = []
    pending = list(windows)
    compiled: CompiledWindows | None = None
    try:
        if engine == "auto" and models:
            compiled, reason = _try_compiled(session, tenant_id, models)
            if compiled is None and isinstance(reason, TableMissing) and len(pending) > 1:
                on_engine(f"dbt for the first window: {reason}")
                first = session.run_window(pending.pop(0), tenant_id, selectors)
                done.append(first)
                on_window(first)
                if not first.success:
                    return BackfillOutcome(tuple(done), len(windows), time.monotonic() - started)
                compiled, reason = _try_compiled(session, tenant_id, models)
        else:
            reason = NotCompilable("--engine dbt" if engine == "dbt" else "no models selected")
        if compiled is not None:
            on_engine(f"compiled: dbt compiled {len(compiled.models)} model(s) once; one transaction per window")
        else:
            on_engine(f"dbt per window: {reason}")
        for window in pending:
            result = _run_compiled(compiled, window) if compiled else session.run_window(window, tenant_id, selectors)
            done.append(result)
            on_window(result)
            if not result.success:
                break
    finally:
        if compiled is not None:
            compiled.close()
    return BackfillOutcome(tuple(done), len(windows), time.monotonic() - started)


def _try_compiled(
    session: DbtSession, tenant_id: str | None, models: Sequence[str]
) -> tuple[CompiledWindows | None, NotCompilable | None]:
    try:
        return session.compiled_windows(tenant_id, models), None
    except NotCompilable as e:
        return None, e


def _run_compiled(compiled: CompiledWindows, window: Window) -> WindowResult:
    started = time.monotonic()
    rows, error = compiled.run(window.start, window.end)
    seconds = time.monotonic() - started
    results = tuple(ModelResult(name, "success", n, None, None) for name, n in rows)
    return WindowResult(window, error is None, seconds, results, error)
