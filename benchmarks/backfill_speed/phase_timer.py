"""Where the time of an ``--engine dbt`` window goes: dbt's own functions, wrapped to time each call.

``PhaseTimer.patch`` replaces a function (or method, classmethods included) with a timed wrapper
until ``restore``; ``PHASES`` are the dbt functions ``in_process`` times, with where each runs.
"""

from __future__ import annotations

import functools
import importlib
import threading
import time
from collections.abc import Callable
from typing import Any, Final


class PhaseTimer:
    """Accumulates wall time per phase across threads (dbt runs models on a thread pool)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._saved: list[tuple[Any, str, Any]] = []

    def add(self, key: str, seconds: float) -> None:
        with self._lock:
            self.seconds[key] = self.seconds.get(key, 0.0) + seconds
            self.calls[key] = self.calls.get(key, 0) + 1

    def reset(self) -> None:
        with self._lock:
            self.seconds.clear()
            self.calls.clear()

    def _wrap(self, key: str, func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                self.add(key, time.perf_counter() - started)

        return timed

    def patch(self, key: str, module: str, attribute: str) -> None:
        """Time ``module.attribute`` (``Class.method`` allowed, classmethods included)."""
        owner: Any = importlib.import_module(module)
        *path, name = attribute.split(".")
        for part in path:
            owner = getattr(owner, part)
        raw = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        self._saved.append((owner, name, raw))
        if isinstance(raw, classmethod):
            setattr(owner, name, classmethod(self._wrap(key, raw.__func__)))
        else:
            setattr(owner, name, self._wrap(key, raw))

    def restore(self) -> None:
        for owner, name, raw in reversed(self._saved):
            setattr(owner, name, raw)
        self._saved.clear()


#: (phase, module, attribute, where it runs, what it is). Phases may nest; see README.
PHASES: Final = (
    ("invoke", "dbt.cli.main", "dbtRunner.invoke", "main", "one dbtRunner.invoke: everything dbt does for a window"),
    (
        "manifest_copy",
        "dbt.contracts.graph.manifest",
        "Manifest.deepcopy",
        "main",
        "runner's copy of the parsed manifest",
    ),
    ("event_logger", "dbt.cli.requires", "setup_event_logger", "main", "dbt re-creates its loggers"),
    ("load_profile", "dbt.cli.requires", "load_profile", "main", "profiles.yml read and rendered"),
    ("load_project", "dbt.cli.requires", "load_project", "main", "dbt_project.yml read and rendered"),
    ("plugin_manager", "dbt.cli.requires", "set_up_plugin_manager", "main", "scans installed modules for dbt plugins"),
    ("runtime_config", "dbt.config.runtime", "RuntimeConfig.from_parts", "main", "RuntimeConfig built"),
    ("register_adapter", "dbt.cli.requires", "register_adapter", "main", "new Postgres adapter"),
    ("before_run", "dbt.task.run", "RunTask.before_run", "main", "create schemas, relation cache, on-run-start"),
    ("execute_nodes", "dbt.task.runnable", "GraphRunnableTask.execute_nodes", "main", "thread pool running models"),
    ("after_run", "dbt.task.run", "RunTask.after_run", "main", "on-run-end, connection clean-up"),
    ("model_total", "dbt.task.runnable", "GraphRunnableTask.call_runner", "worker", "one model, all included"),
    ("model_compile", "dbt.compilation", "Compiler.compile_node", "worker", "Jinja -> SQL for one model"),
    ("model_materialize", "dbt.task.run", "ModelRunner.execute", "worker", "materialization macro incl. its SQL"),
    ("sql", "dbt.adapters.sql.connections", "SQLConnectionManager.add_query", "any", "SQL statements, round trip"),
    (
        "connection_open",
        "dbt.adapters.postgres.connections",
        "PostgresConnectionManager.open",
        "any",
        "psycopg2 connect",
    ),
)
