"""How a session calls dbt: in-process ``dbtRunner`` invocations, their flags and variables, and
the connection environment they run in.

Users give a single ``DATABASE_URL``; it reaches dbt only as environment variables
(``DBT_PG_*`` for the profile, libpq's ``PG*`` for the URL's other parameters), never as a file
or a command-line argument.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

from dbtbackfill.core import database_url as database_url_module
from dbtbackfill.core.database_url import ConnectionSettings, DatabaseUrlError
from dbtbackfill.core.planner import Window
from dbtbackfill.runner.results import WindowResult, batch_rows, error_text, model_results

DEFAULT_SCHEMA: Final = "analytics"
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


@contextmanager
def environ_overrides(overrides: dict[str, str]) -> Iterator[None]:
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


def session_environment(database_url: str) -> tuple[dict[str, str], dict[str, str]]:
    """A new session's ``DBT_PG_*`` variables (set in ``os.environ`` now) and libpq's ``PG*`` ones.

    The ``DBT_PG_*`` ones are what analytics/profiles.yml and a generated profile read, fixed for
    the session; libpq's cover the URL's other parameters and are set only while dbt runs.
    """
    env, libpq_env = dbt_env(database_url), connection_settings(database_url).libpq_env()
    os.environ.update(env)
    # No usage pings: our machines, and many users', have no route to dbt's tracker.
    os.environ.setdefault("DBT_SEND_ANONYMOUS_USAGE_STATS", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    return env, libpq_env


_PRISTINE_BEHAVIOR_FLAGS: list[Any] | None = None


def reset_adapter_behavior_flags() -> None:
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


def window_vars(window: Window, tenant_id: str | None) -> dict[str, Any]:
    return {
        "backfill_start_date": window.start.isoformat(),
        "backfill_end_date": window.end.isoformat(),
        "tenant_id": tenant_id,
    }


@dataclass
class DbtInvocation:
    """The flags and the environment of one session's dbt invocations, and the invocations."""

    project_dir: Path
    profiles_dir: Path
    target_path: Path
    log_path: Path
    target_name: str | None
    threads: int | None
    quiet: bool
    #: The ``DBT_PG_*`` values of this session, fixed when it starts.
    env: dict[str, str]
    #: libpq's ``PG*`` variables for the URL's other parameters, set only while dbt runs.
    libpq_env: dict[str, str]

    def common_args(self) -> list[str]:
        args = ["--project-dir", str(self.project_dir), "--profiles-dir", str(self.profiles_dir)]
        args += ["--target-path", str(self.target_path), "--log-path", str(self.log_path)]
        if self.target_name:
            args += ["--target", self.target_name]
        return args

    def global_args(self) -> list[str]:
        # dbt's file log duplicates what we print, and in-process runs leak its handle.
        base = ["--no-use-colors", "--log-level-file", "none"]
        return ["--quiet", *base] if self.quiet else base

    @contextmanager
    def environment(self) -> Iterator[None]:
        """This session's connection variables, for one dbt invocation.

        dbt reads the profile's variables on every invocation, and another session in this
        process (a test comparing engines, say) may have set them for its own database. The
        libpq ones are undone afterwards: they would reach every other connection too.
        """
        os.environ.update(self.env)
        with environ_overrides(self.libpq_env):
            yield

    def invoke(self, command: str, *args: str, manifest: Any, callbacks: Sequence[Callable[[Any], None]] = ()) -> Any:
        """One in-process dbt command on ``manifest``, a copy of the parse this invocation may mutate."""
        from dbt.cli.main import dbtRunner

        reset_adapter_behavior_flags()
        runner = dbtRunner(manifest=manifest, callbacks=list(callbacks))
        with self.environment():
            return runner.invoke([*self.global_args(), command, *self.common_args(), *args])

    def window_args(
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

    def window(
        self, command: str, fresh_manifest: Callable[[], Any], window: Window, tenant_id: str | None,
        selectors: Sequence[str], *, event_time: bool = False,
    ) -> WindowResult:  # fmt: skip
        """``dbt run`` (or ``compile``) of ``selectors`` for one window, read into a WindowResult.

        ``fresh_manifest`` makes the copy of the parse dbt may mutate; it is timed with the window.
        """
        started = time.monotonic()
        extra = ["--no-write-json"] if command == "run" else []
        batches: dict[str, int] = {}

        def count_batch(event: Any) -> None:
            found = batch_rows(event)
            if found is not None:
                batches[found[0]] = batches.get(found[0], 0) + found[1]

        args = self.window_args(window, tenant_id, selectors, event_time=event_time)
        res = self.invoke(
            command, *args, *extra, manifest=fresh_manifest(), callbacks=[count_batch] if event_time else []
        )
        models = model_results(res.result, batches)
        seconds = time.monotonic() - started
        if res.success:
            return WindowResult(window, True, seconds, models)
        return WindowResult(window, False, seconds, models, error_text(res, models))

    def select_models(self, manifest: Any, selectors: Sequence[str]) -> list[str]:
        """The models a selection matches; an empty match is an error, not a no-op."""
        # dbt prints ls results even with --quiet; they are for us, not the user.
        args = ["--resource-type", "model", "--output", "name", "--log-level", "none"]
        # Each selector must match something, not just their union: a typo next to a good
        # selector would otherwise drop models from the backfill without a word.
        args += ["--warn-error-options", json.dumps({"error": ["NoNodesForSelectionCriteria"]})]
        if selectors:
            args += ["--select", *selectors]
        res = self.invoke("ls", *args, manifest=manifest)
        if not res.success:
            unmatched = _UNMATCHED_RE.search(str(res.exception))
            if unmatched:
                raise RunnerError(f"selection matched no models: --models {unmatched[1]} matches nothing")
            raise RunnerError(f"invalid model selection {' '.join(selectors)!r}: {res.exception}")
        names = sorted(str(n) for n in (res.result or []))
        if not names:
            raise RunnerError(f"selection matched no models: {' '.join(selectors) or '(all)'}")
        return names
