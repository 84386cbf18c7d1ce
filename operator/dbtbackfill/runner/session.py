"""Run dbt over backfill windows in-process, with the manifest parsed once.

Starting dbt costs far more than a window's SQL (about 2.5 s for a fresh ``dbt run``
against about 0.13 s for an in-process invocation that reuses a parsed manifest), so
a backfill parses the project once. Models that follow the backfill contract are then
compiled once and every window runs from that SQL (:mod:`dbtbackfill.runner.compiled`); other
selections run each window as one ``dbtRunner`` invocation on the parsed manifest.
Which project, profile and target dbt uses is decided by :mod:`dbtbackfill.runner.project`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

from dbtbackfill.core import database_url as database_url_module
from dbtbackfill.core.database_url import ConnectionSettings, DatabaseUrlError
from dbtbackfill.core.planner import Window
from dbtbackfill.runner.compiled import (
    CompiledWindows,
    Hook,
    ModelNode,
    NotCompilable,
    TableMissing,
    compiled_vars,
    plan_models,
)
from dbtbackfill.runner.parse_key import parse_environment, project_connection_reads
from dbtbackfill.runner.project import ProjectError, Resolved, Target, find_project_dir, resolve
from dbtbackfill.runner.window_tests import WindowTests, attached_tests, scope, window_test

DEFAULT_SCHEMA: Final = "analytics"
_BOOTSTRAP_LOCK_KEY: Final = 0x64627463  # "dbtc": first creation of the project's tables
#: dbt's NoNodesForSelectionCriteria, raised as an error (dbt-core 1.11's wording).
_UNMATCHED_RE: Final = re.compile(r"selection criterion '(.+)' does not match any enabled nodes")


class RunnerError(RuntimeError):
    """dbt could not be set up for this backfill (bad selection, broken project, ...)."""


def connection_settings(database_url: str) -> ConnectionSettings:
    """The URL's connection settings (see :mod:`dbtbackfill.core.database_url`), or RunnerError."""
    try:
        return database_url_module.parse(database_url)
    except DatabaseUrlError as exc:
        raise RunnerError(str(exc)) from None


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
    return connection_settings(database_url).dbt_env(schema or os.environ.get("DBT_PG_SCHEMA") or DEFAULT_SCHEMA)


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


def copy_manifest(manifest: Any) -> Any:
    """A copy of a parsed manifest that one dbt invocation may mutate.

    dbt compiles into the nodes it is given (ephemeral CTEs injected and flagged as done), so
    each invocation needs its own nodes. Only those are copied: ``Manifest.deepcopy()`` also
    round-trips every other part through ``to_dict``/``from_dict``, which fails on real projects
    (disabled nodes are lists: ``'list' object has no attribute 'from_dict'``; saved queries'
    ``query_params`` do not survive the round trip) and costs most of its time on macros dbt
    never changes. Everything but the nodes and unit tests is shared, read-only, with the parse.
    """
    from dbt.contracts.graph.manifest import Manifest

    def node_copy(node: Any) -> Any:
        try:
            return node.from_dict(node.to_dict(omit_none=True))
        except Exception:  # a node type whose round trip is lossy: copy it as an object
            import copy

            return copy.deepcopy(node)

    copied: Any = Manifest(
        nodes={k: node_copy(v) for k, v in manifest.nodes.items()},
        sources=manifest.sources,
        macros=manifest.macros,
        docs=manifest.docs,
        exposures=manifest.exposures,
        functions=manifest.functions,
        metrics=manifest.metrics,
        groups=manifest.groups,
        selectors=manifest.selectors,
        metadata=manifest.metadata,
        disabled=manifest.disabled,
        files=manifest.files,
        state_check=manifest.state_check,
        semantic_models=manifest.semantic_models,
        unit_tests={k: node_copy(v) for k, v in manifest.unit_tests.items()},
        saved_queries=manifest.saved_queries,
    )
    copied.build_flat_graph()
    return copied


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


def node_label(node: Any) -> str:
    """A model's name as ``dbt ls --output name`` prints it: ``customers.v2`` for a versioned model."""
    version = getattr(node, "version", None)
    return f"{node.name}.v{version}" if version is not None else str(node.name)


def model_node(node: Any, nodes: Any) -> ModelNode:
    """The parts of a compiled dbt model node :mod:`dbtbackfill.runner.compiled` plans with.

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
        name=node_label(node),
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


def _model_results(result: Any, batches: dict[str, int] | None = None) -> tuple[ModelResult, ...]:
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
    #: ``--project-dir``/``--profiles-dir``/``--target``; None: see :mod:`dbtbackfill.runner.project`.
    project_dir: Path | str | None = None
    profiles_dir: Path | str | None = None
    target: str | None = None
    threads: int | None = None
    target_path: Path | None = None
    log_path: Path | None = None
    quiet: bool = True
    _manifest: Any = None
    _bootstrapped: bool = False
    #: The last :meth:`compile_params`, kept for the next :meth:`compiled_windows` of the same models.
    _params_compiled: tuple[tuple[str | None, tuple[str, ...]], list[Any]] | None = None
    base_target: Path = field(init=False)
    resolved: Resolved = field(init=False)
    #: The ``DBT_PG_*`` values of this session, fixed when it starts.
    _env: dict[str, str] = field(init=False, default_factory=dict)
    #: libpq's ``PG*`` variables for the URL's other parameters, set only while dbt runs.
    _libpq_env: dict[str, str] = field(init=False, default_factory=dict)
    # How the last parse() went, for the user: "reused the saved parse" or why it could not.
    parse_report: str = field(init=False, default="")

    def __post_init__(self) -> None:
        try:
            project_dir = find_project_dir(str(self.project_dir) if self.project_dir else None, os.environ, Path.cwd())
        except ProjectError as exc:
            raise RunnerError(str(exc)) from None
        self.project_dir = project_dir
        env_target = os.environ.get("DBT_TARGET_PATH")
        env_logs = os.environ.get("DBT_LOG_PATH")
        self.base_target = Path(self.target_path or env_target or project_dir / "target")
        # A private target dir per process: concurrent backfills (parallel chunks on one
        # node, two users on one checkout) would otherwise overwrite each other's manifest.
        self.base_target.mkdir(parents=True, exist_ok=True)
        self.target_path = Path(tempfile.mkdtemp(prefix=".run-", dir=self.base_target))
        self.log_path = Path(self.log_path or env_logs or project_dir / "logs")
        # The DBT_PG_* variables analytics/profiles.yml and a generated profile read, fixed for
        # this session; libpq's PG* ones for the URL's other parameters, set only while dbt runs.
        self._env = dbt_env(self.database_url)
        self._libpq_env = connection_settings(self.database_url).libpq_env()
        os.environ.update(self._env)
        # No usage pings: our machines, and many users', have no route to dbt's tracker.
        os.environ.setdefault("DBT_SEND_ANONYMOUS_USAGE_STATS", "false")
        os.environ.setdefault("DO_NOT_TRACK", "1")
        try:
            self.resolved = resolve(
                project_dir=str(project_dir),
                profiles_dir=str(self.profiles_dir) if self.profiles_dir else None,
                target=self.target,
                generated_dir=self.target_path / "profile",
            )
        except ProjectError as exc:
            self.close()
            raise RunnerError(str(exc)) from None
        self._seed_partial_parse()

    def connect_args(self) -> dict[str, str]:
        """psycopg keyword arguments for the connection dbt's target makes.

        The profile's fields, and the URL's other parameters, which reach dbt's own connections
        through libpq's environment (:meth:`_environment`); the profile wins, as it does for dbt.
        """
        return {**connection_settings(self.database_url).beyond_profile(), **self.data_target.connect}

    @property
    def data_target(self) -> Target:
        """Where dbt writes: the resolved profile target (not necessarily DATABASE_URL's database)."""
        return self.resolved.target

    def _seed_partial_parse(self) -> None:
        """Start from the last parse saved in the shared target dir (or the image's)."""
        assert self.target_path is not None
        for candidate in (self.base_target, self.resolved.project.directory / "target"):
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
            str(self.resolved.profiles_dir),
            "--target-path",
            str(self.target_path),
            "--log-path",
            str(self.log_path),
        ]
        if self.resolved.target_name:
            args += ["--target", self.resolved.target_name]
        return args

    def _global_args(self) -> list[str]:
        # dbt's file log duplicates what we print, and in-process runs leak its handle.
        base = ["--no-use-colors", "--log-level-file", "none"]
        return ["--quiet", *base] if self.quiet else base

    def _invoke(
        self, command: str, *args: str, callbacks: Sequence[Callable[[Any], None]] = (), manifest: Any = None
    ) -> Any:
        from dbt.cli.main import dbtRunner

        _reset_adapter_behavior_flags()
        if self._manifest is None:
            raise RunnerError("call parse() first")
        # dbt mutates the manifest while compiling (ephemeral models get their CTEs injected
        # and flagged as done), so a reused manifest breaks the next window's SQL. Each
        # invocation gets a fresh copy of the parsed one: far cheaper than parsing again.
        runner = dbtRunner(manifest=copy_manifest(manifest or self._manifest), callbacks=list(callbacks))
        with self._environment():
            return runner.invoke([*self._global_args(), command, *self._common_args(), *args])

    @contextmanager
    def _environment(self) -> Iterator[None]:
        """This session's connection variables, for one dbt invocation.

        dbt reads the profile's variables on every invocation, and another session in this
        process (a test comparing engines, say) may have set them for its own database. The
        libpq ones are undone afterwards: they would reach every other connection too.
        """
        os.environ.update(self._env)
        with _environment(self._libpq_env):
            yield

    def parse(self) -> None:
        """Parse the project, reusing the saved parse (the image's, or the last run's) when dbt allows.

        The parse sees placeholder host/port/user/password (:mod:`dbtbackfill.runner.parse_key`), so a
        parse saved for other credentials but the same database and schema is reused; the
        real credentials are back in the environment before anything connects.
        """
        from dbt.cli.main import dbtRunner

        _reset_adapter_behavior_flags()  # snapshots the list before dbt's first adapter
        reads = project_connection_reads(_project_sources(Path(self.project_dir or ".")))
        reasons: list[str] = []

        def on_event(event: Any) -> None:
            if event.info.name == "UnableToPartialParse":
                reasons.append(str(event.data.reason))

        started = time.monotonic()
        with self._environment(), _environment(parse_environment(os.environ, reads)):
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
        # Each selector must match something, not just their union: a typo next to a good
        # selector would otherwise drop models from the backfill without a word.
        args += ["--warn-error-options", json.dumps({"error": ["NoNodesForSelectionCriteria"]})]
        if selectors:
            args += ["--select", *selectors]
        res = self._invoke("ls", *args)
        if not res.success:
            unmatched = _UNMATCHED_RE.search(str(res.exception))
            if unmatched:
                raise RunnerError(f"selection matched no models: --models {unmatched[1]} matches nothing")
            raise RunnerError(f"invalid model selection {' '.join(selectors)!r}: {res.exception}")
        names = sorted(str(n) for n in (res.result or []))
        if not names:
            raise RunnerError(f"selection matched no models: {' '.join(selectors) or '(all)'}")
        return names

    def microbatch_models(self, models: Sequence[str]) -> list[str]:
        """Those of ``models`` dbt runs as microbatch (``incremental_strategy='microbatch'``)."""
        nodes = self._manifest.nodes.values() if self._manifest is not None else ()
        return sorted(
            {
                node_label(n)
                for n in nodes
                if n.resource_type == "model"
                and node_label(n) in models
                and n.config.incremental_strategy == "microbatch"
            }
        )

    def reader_of(self, models: Sequence[str], sources: Sequence[str]) -> tuple[str, str] | None:
        """``(model, source)``: one of ``models`` that reads one of ``sources``, directly or not."""
        if self._manifest is None or not sources:
            return None
        nodes = self._manifest.nodes
        ids = {uid: node_label(n) for uid, n in nodes.items() if n.resource_type == "model"}
        for uid, name in ids.items():
            if name not in models:
                continue
            seen: set[str] = set()
            pending = list(nodes[uid].depends_on.nodes)
            while pending:
                dep = pending.pop()
                if dep in seen or dep not in ids:
                    continue
                seen.add(dep)
                if ids[dep] in sources:
                    return name, ids[dep]
                pending.extend(nodes[dep].depends_on.nodes)
        return None

    def _window_args(
        self, window: Window, tenant_id: str | None, selectors: Sequence[str], *, event_time: bool = False
    ) -> list[str]:
        args = ["--vars", json.dumps(window_vars(window, tenant_id))]
        if selectors:
            args += ["--select", *selectors]
        if self.threads:
            args += ["--threads", str(self.threads)]
        if event_time:  # microbatch models: the window's batches, end exclusive
            args += ["--event-time-start", window.start.isoformat()]
            args += ["--event-time-end", (window.end + timedelta(days=1)).isoformat()]
        return args

    def compile(self, window: Window, tenant_id: str | None, selectors: Sequence[str]) -> WindowResult:
        """Render every selected model for one window, touching no data."""
        return self._execute("compile", window, tenant_id, selectors)

    def run_window(
        self, window: Window, tenant_id: str | None, selectors: Sequence[str], *, event_time: bool = False
    ) -> WindowResult:
        """One dbt run of ``selectors`` for ``window``; ``event_time`` bounds microbatch models by it."""
        if self._bootstrapped:
            return self._execute("run", window, tenant_id, selectors, event_time=event_time)
        # The first run against a database creates the fact tables. Parallel chunks would race
        # to create the same table (and all but one would fail), so until every table exists,
        # runs take turns under a database-wide advisory lock.
        with self._bootstrap_lock() as missing:
            result = self._execute("run", window, tenant_id, selectors, event_time=event_time)
        self._bootstrapped = result.success or not missing
        return result

    def compiled_windows(
        self, tenant_id: str | None, models: Sequence[str], verify: WindowTests | None = None
    ) -> CompiledWindows:
        """Compile ``models`` once for every window and prepare their statements.

        Raises :class:`NotCompilable` (with the reason) when a model is outside the backfill
        contract, a table does not exist yet, or a schema changed: those windows need dbt itself.
        """
        if self._manifest is None:
            raise RunnerError("call parse() first")
        hooks = [n.name for n in self._manifest.nodes.values() if n.resource_type == "operation"]
        if hooks:
            raise NotCompilable(f"the project has on-run-start/on-run-end hooks ({', '.join(sorted(hooks))})")
        cached, self._params_compiled = self._params_compiled, None
        if cached is not None and cached[0] == (tenant_id, tuple(models)):
            compiled = cached[1]
        else:
            compiled = self.compile_params(tenant_id, models)
            self._params_compiled = None
        nodes = [model_node(n, self._manifest.nodes) for n in compiled]
        checks = verify.in_transaction if verify is not None and verify.tests else None
        # The target's database, not DATABASE_URL's: that is where dbt created these tables.
        return CompiledWindows.open(self.connect_args(), plan_models(nodes), tenant_id, checks)

    def compile_params(self, tenant_id: str | None, models: Sequence[str]) -> list[Any]:
        """The ``models``' dbt nodes compiled once, with the window as ``$1``/``$2``; raises NotCompilable.

        The next :meth:`compiled_windows` of the same models uses them instead of compiling again.
        """
        # dbt compile prints the SQL of selected nodes even with --quiet; it is for us, not the user.
        args = ["--vars", json.dumps(compiled_vars(tenant_id)), "--select", *models, "--no-write-json"]
        args += ["--log-level", "none"]
        res = self._invoke("compile", *args)
        if not res.success:
            raise NotCompilable(f"dbt could not compile the models once for all windows: {_error_text(res, [])}")
        nodes = [r.node for r in res.result.results if r.node.resource_type == "model" and node_label(r.node) in models]
        self._params_compiled = ((tenant_id, tuple(models)), nodes)
        return nodes

    def window_tests(self, tenant_id: str | None, models: Sequence[str]) -> WindowTests:
        """The data tests attached to ``models``, compiled once, scoped to the window (``$1``/``$2``) and tenant.

        Raises RunnerError when dbt cannot compile them (see :mod:`dbtbackfill.runner.window_tests`).
        """
        if self._manifest is None:
            raise RunnerError("call parse() first")
        manifest = copy_manifest(self._manifest)
        selected = {
            n.unique_id: n
            for n in manifest.nodes.values()
            if n.resource_type == "model" and node_label(n) in models and n.config.materialized != "ephemeral"
        }
        tests = attached_tests(manifest.nodes.values(), selected)
        connect = self.connect_args()
        if not tests:
            return WindowTests([], connect)
        for test in tests:  # dbt's own where config: {{ model }} in the test reads the window's rows
            test.config.where = scope(selected[test.attached_node], tenant_id, test.config.where)
        args = ["--vars", json.dumps(compiled_vars(tenant_id)), "--select", *sorted({t.name for t in tests})]
        res = self._invoke("compile", *args, "--no-write-json", "--log-level", "none", manifest=manifest)
        if not res.success:
            raise RunnerError(f"dbt could not compile the data tests for --verify: {_error_text(res, [])}")
        compiled = {r.node.unique_id: r.node for r in res.result.results if r.node.resource_type == "test"}
        return WindowTests(
            [window_test(compiled[t.unique_id], selected[t.attached_node]) for t in tests if t.unique_id in compiled],
            connect,
        )

    def _relations(self) -> list[tuple[str, str]]:
        nodes = self._manifest.nodes.values() if self._manifest is not None else ()
        return [
            (n.schema, n.alias)
            for n in nodes
            if n.resource_type == "model" and n.config.materialized not in ("ephemeral", "view")
        ]

    @contextmanager
    def _bootstrap_lock(self) -> Iterator[bool]:
        import psycopg
        from psycopg.conninfo import make_conninfo

        relations = self._relations()
        schemas = [schema for schema, _ in relations]
        tables = [table for _, table in relations]
        # The target's database: where dbt creates the tables (and parallel chunks would race).
        with psycopg.connect(make_conninfo(**self.connect_args()), autocommit=True) as conn:

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

    def _execute(
        self, command: str, window: Window, tenant_id: str | None, selectors: Sequence[str], *, event_time: bool = False
    ) -> WindowResult:
        started = time.monotonic()
        extra = ["--no-write-json"] if command == "run" else []
        batches: dict[str, int] = {}

        def count_batch(event: Any) -> None:
            found = batch_rows(event)
            if found is not None:
                batches[found[0]] = batches.get(found[0], 0) + found[1]

        args = self._window_args(window, tenant_id, selectors, event_time=event_time)
        res = self._invoke(command, *args, *extra, callbacks=[count_batch] if event_time else [])
        models = _model_results(res.result, batches)
        seconds = time.monotonic() - started
        if res.success:
            return WindowResult(window, True, seconds, models)
        return WindowResult(window, False, seconds, models, _error_text(res, models))


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
