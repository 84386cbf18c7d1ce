"""The selected models' data tests, scoped to one window and tenant, for ``--verify``.

dbt compiles each generic test attached to a selected model once, with dbt's own ``where``
test config set to the model's window (``$1``/``$2``, the ``backfill_delete_window`` columns)
and tenant, so ``{{ model }}`` in the test reads only the rows the window wrote. Each window
then runs every test as dbt's test materialization would (``fail_calc``, ``error_if``) with the
window bound: the compiled engine inside the window's transaction, before it commits; the dbt
engine right after dbt's run of the window, on a connection of its own.

Only tests attached to a model (``data_tests:`` on the model or its columns) run; singular
tests and tests with ``severity: warn`` do not.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING, Any

from dbtbackfill.runner.compiled import _pg_message, _static_hook, window_delete_hook, window_predicate

if TYPE_CHECKING:
    import psycopg


@dataclass(frozen=True)
class WindowTest:
    name: str
    model: str
    #: One row: ``failures`` and ``should_error``; binds the window as ``$1``/``$2`` when ``takes_window``.
    sql: str
    takes_window: bool
    #: Plain statements the model runs before its SQL (``set time zone 'UTC'``): the same session
    #: settings make the test see the window as the model's delete did.
    setup: tuple[str, ...] = ()


def scope(model: Any, tenant_id: str | None, where: str | None) -> str | None:
    """The test ``where`` that limits ``model``'s rows to the window and tenant, or None.

    A model without a ``backfill_delete_window`` pre-hook has no known window column: its
    tests read the whole table.
    """
    hooks = [h for h in (window_delete_hook(p.sql) for p in model.config.pre_hook) if h is not None]
    if not hooks:
        return where
    window = window_predicate(hooks[0], tenant_id)
    return f"({where}) and {window}" if where else window


def attached_tests(nodes: Iterable[Any], models: Mapping[str, Any]) -> list[Any]:
    """The generic tests attached to ``models`` (unique id -> node) whose failures fail a window."""
    return [
        n
        for n in nodes
        if n.resource_type == "test"
        and getattr(n, "attached_node", None) in models
        and str(n.config.severity).lower() == "error"
    ]


def failures_query(compiled_code: str, fail_calc: str, error_if: str) -> str:
    """dbt's test materialization around a test's SQL (``get_test_sql``), as one row."""
    return (
        f"select {fail_calc} as failures, {fail_calc} {error_if} as should_error\n"
        f"from (\n{compiled_code.rstrip()}\n) dbt_internal_test"
    )


def window_test(node: Any, model: Any) -> WindowTest:
    """A compiled test node (``model`` is the node it is attached to) as a window test."""
    sql = failures_query(node.compiled_code or "", node.config.fail_calc, node.config.error_if)
    setup = tuple(s for s in (_static_hook(h.sql) for h in model.config.pre_hook) if s is not None)
    return WindowTest(node.name, model.name, sql, "$1" in sql, setup)


def run_tests(conn: psycopg.Connection[Any], tests: Sequence[WindowTest], start: date, end: date) -> str | None:
    """Run ``tests`` for one window on ``conn``'s open transaction: the failures, or None when all pass.

    The caller owns the transaction: it commits or rolls back the window.
    """
    import psycopg

    failed: list[str] = []
    done_setup: set[str] = set()
    for test in tests:
        try:
            for statement in test.setup:
                if statement not in done_setup:
                    conn.execute(statement.encode())
                    done_setup.add(statement)
            row = conn.execute(test.sql.encode(), (start, end) if test.takes_window else None).fetchone()
        except psycopg.Error as e:  # the transaction is aborted: later tests cannot run
            failed.append(f"test {test.name} could not run: {_pg_message(e)}")
            break
        failures, should_error = (row or (0, False))[:2]
        if should_error:
            failed.append(f"test {test.name} failed: {failures} failing row(s)")
    return "; ".join(failed) if failed else None


class WindowTests:
    """Window tests and a connection of their own, for windows that dbt ran (and committed)."""

    def __init__(self, tests: Sequence[WindowTest], connect: Mapping[str, str]) -> None:
        self.tests = tuple(tests)
        self._connect = dict(connect)
        self._conn: psycopg.Connection[Any] | None = None

    def in_transaction(self, conn: psycopg.Connection[Any], start: date, end: date) -> str | None:
        """For the compiled engine: run on the window's own transaction, before it commits."""
        return run_tests(conn, self.tests, start, end)

    def after_window(self, start: date, end: date) -> str | None:
        """For the dbt engine: run on a separate, rolled-back transaction after dbt committed the window."""
        import psycopg
        from psycopg.conninfo import make_conninfo

        if not self.tests:
            return None
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(
                make_conninfo(**self._connect),  # the target's application_name, as every connection
                autocommit=False,
                cursor_factory=psycopg.RawCursor,
            )
        try:
            return run_tests(self._conn, self.tests, start, end)
        finally:
            self._conn.rollback()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
