"""Run many backfill windows from SQL that dbt compiled once.

A dbt invocation costs about 0.25 s of set-up before any SQL, so a year of ``--chunk day``
windows spends minutes in dbt and seconds in PostgreSQL. For models that follow the backfill
contract (incremental, ``delete+insert`` on a ``unique_key``, a ``backfill_delete_window``
pre-hook, the window read through ``backfill_date_range``), what dbt runs for a window is
known in advance:

1. the model's pre-hooks, the window delete among them;
2. the model's SQL for that window into a temporary relation;
3. ``delete from target where (unique key) in (select distinct (unique key) from new rows)``,
   as a statement of its own;
4. ``insert into target (target's columns) select those columns from new rows``.

So dbt compiles each model once, with ``backfill_date_range`` rendering the window as the
typed statement parameters ``$1``/``$2`` (see ``backfill__param_start`` in dbt-package/macros), and
this module checks those statements on one connection and executes them per window: one
transaction per window covering every model, so a window is either fully replaced or
untouched. Anything outside the contract (a view or table model, a hook with Jinja in it,
grants, project ``on-run-*`` hooks, a schema change to reconcile, a model reading the window
vars directly) is reported by :func:`model_plan` and the runner falls back to one dbt
invocation per window, where dbt applies its own rules.

The planning half is pure (dataclasses in, SQL text out) and unit-tested directly; the
:class:`CompiledWindows` executor is the I/O half.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from graphlib import CycleError, TopologicalSorter
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import psycopg

#: What the runner passes as ``backfill_start_date``/``backfill_end_date`` to compile once for
#: every window; the macros render them as ``$1``/``$2``. The same text as in dbt-package/macros/backfill.sql.
PARAM_START: Final = "__backfill_window_start__"
PARAM_END: Final = "__backfill_window_end__"

_IDENT: Final = r"[A-Za-z_][A-Za-z0-9_]*"
_IDENT_RE: Final = re.compile(_IDENT)
#: The pre-hook, as the package spells it (``dbt_backfill.backfill_delete_window``) or through a
#: project macro of the same name that forwards to it (analytics/macros/backfill.sql).
_WINDOW_HOOK_RE: Final = re.compile(
    r"\{\{-?\s*(?:dbt_backfill\s*\.\s*)?backfill_delete_window\(\s*(?:date_column\s*=\s*)?"
    r"['\"](?P<date>" + _IDENT + r")['\"]\s*"
    r"(?:,\s*(?:tenant_column\s*=\s*)?(?:['\"](?P<tenant>" + _IDENT + r")['\"]|(?P<no_tenant>none|None))\s*)?"
    r",?\s*\)\s*-?\}\}"
)
_JINJA_RE: Final = re.compile(r"\{[{%#]")


@dataclass(frozen=True)
class Hook:
    sql: str
    inside_transaction: bool = True


@dataclass(frozen=True)
class ModelNode:
    """The parts of a compiled dbt model node the plan needs (see ``runner.model_nodes``)."""

    unique_id: str
    name: str
    materialized: str
    compiled_code: str
    relation_name: str | None
    schema: str
    table: str
    incremental_strategy: str | None = None
    unique_key: tuple[str, ...] = ()
    pre_hooks: tuple[Hook, ...] = ()
    post_hooks: tuple[Hook, ...] = ()
    incremental_predicates: tuple[str, ...] = ()
    grants: bool = False
    persist_docs: bool = False
    #: Models (not ephemerals) this one reads, directly or through ephemeral models.
    depends_on: tuple[str, ...] = ()


@dataclass(frozen=True)
class WindowDelete:
    """The ``backfill_delete_window`` pre-hook, as its columns."""

    date_column: str
    #: None for a table without tenants (``tenant_column=none``): the window is deleted for all.
    tenant_column: str | None = "tenant_id"


@dataclass(frozen=True)
class ModelPlan:
    """One model's per-window statements, before the table's columns are known."""

    unique_id: str
    name: str
    relation: str
    schema: str
    table: str
    unique_key: tuple[str, ...]
    #: In the model's pre-hook order: static SQL, or the window delete.
    pre_hooks: tuple[str | WindowDelete, ...]
    compiled_code: str
    depends_on: tuple[str, ...]


class NotCompilable(Exception):
    """Why these models need a dbt invocation per window (the message says which and why)."""


class TableMissing(NotCompilable):
    """A model's table does not exist yet: dbt must create it (in the first window)."""


def quote_ident(name: str) -> str:
    """PostgreSQL identifier quoting, as dbt-postgres' ``adapter.quote``."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _static_hook(sql: str) -> str | None:
    """The hook's SQL if it is one plain statement (no Jinja), else None."""
    text = sql.strip().rstrip(";").strip()
    if not text or _JINJA_RE.search(text) or ";" in text:
        return None
    return text


def window_delete_hook(sql: str) -> WindowDelete | None:
    """The columns of a pre-hook that is exactly one ``backfill_delete_window`` call, else None."""
    window = _WINDOW_HOOK_RE.fullmatch(sql.strip())
    if window is None:
        return None
    return WindowDelete(window["date"], None if window["no_tenant"] else window["tenant"] or "tenant_id")


def model_plan(node: ModelNode) -> ModelPlan:
    """The plan for one selected model, or :class:`NotCompilable` saying what breaks the contract."""
    where = f"model {node.name}"
    if node.materialized != "incremental":
        raise NotCompilable(f"{where} is materialized as {node.materialized}, not incremental")
    if node.incremental_strategy != "delete+insert":
        raise NotCompilable(f"{where} uses incremental_strategy {node.incremental_strategy}, not delete+insert")
    if not node.unique_key or not all(_IDENT_RE.fullmatch(k) for k in node.unique_key):
        raise NotCompilable(f"{where} has no unique_key of plain column names")
    if node.post_hooks:
        raise NotCompilable(f"{where} has post-hooks")
    if node.incremental_predicates:
        raise NotCompilable(f"{where} has incremental_predicates")
    if node.grants or node.persist_docs:
        raise NotCompilable(f"{where} configures grants or persist_docs, which dbt applies on every run")
    if node.relation_name is None:
        raise NotCompilable(f"{where} has no relation")
    if PARAM_START in node.compiled_code or PARAM_END in node.compiled_code:
        raise NotCompilable(f"{where} reads backfill_start_date/backfill_end_date outside backfill_date_range")
    if "$1" not in node.compiled_code or "$2" not in node.compiled_code:
        raise NotCompilable(f"{where} does not filter its input with backfill_date_range")
    hooks: list[str | WindowDelete] = []
    for hook in node.pre_hooks:
        window = window_delete_hook(hook.sql)
        static = _static_hook(hook.sql)
        if not hook.inside_transaction:
            raise NotCompilable(f"{where} has a pre-hook outside the transaction")
        if window is not None:
            hooks.append(window)
        elif static is not None:
            hooks.append(static)
        else:
            raise NotCompilable(f"{where} has a pre-hook that is not one plain SQL statement: {hook.sql.strip()!r}")
    if sum(isinstance(h, WindowDelete) for h in hooks) != 1:
        raise NotCompilable(f"{where} needs exactly one backfill_delete_window pre-hook")
    return ModelPlan(
        unique_id=node.unique_id,
        name=node.name,
        relation=node.relation_name,
        schema=node.schema,
        table=node.table,
        unique_key=node.unique_key,
        pre_hooks=tuple(hooks),
        compiled_code=node.compiled_code,
        depends_on=node.depends_on,
    )


def plan_models(nodes: Sequence[ModelNode]) -> list[ModelPlan]:
    """Plans for the selected models in dependency order (ties by name), or NotCompilable.

    Ephemeral models are inlined into their readers by dbt and need no statement of their own.
    """
    plans = {n.unique_id: model_plan(n) for n in nodes if n.materialized != "ephemeral"}
    graph = TopologicalSorter({uid: [d for d in p.depends_on if d in plans] for uid, p in plans.items()})
    try:
        graph.prepare()
    except CycleError as e:  # dbt refuses cycles at parse time; kept as a guard
        raise NotCompilable(f"models depend on each other in a cycle: {e.args[1]}") from None
    ordered: list[ModelPlan] = []
    while graph.is_active():
        ready = sorted(graph.get_ready(), key=lambda uid: plans[uid].name)
        ordered.extend(plans[uid] for uid in ready)
        graph.done(*ready)
    return ordered


def window_delete_sql(plan: ModelPlan, hook: WindowDelete, tenant_id: str | None) -> str:
    """``backfill_delete_window``'s statement with the window as ``$1``/``$2`` (same predicate as the macro)."""
    return f"delete from {plan.relation}\nwhere {window_predicate(hook, tenant_id)}"


def window_predicate(hook: WindowDelete, tenant_id: str | None) -> str:
    """The window (``$1``/``$2``) and tenant of a model's rows, as ``backfill_date_range`` filters them."""
    col = quote_ident(hook.date_column)
    sql = f"{col} >= $1::date and {col} < $2::date + 1"
    if tenant_id is not None and hook.tenant_column is not None:
        sql += f" and {quote_ident(hook.tenant_column)} = {quote_literal(tenant_id)}"
    return sql


#: PostgreSQL's identifier limit (NAMEDATALEN - 1); longer names are silently truncated.
MAX_IDENTIFIER: Final = 63
TEMP_SUFFIX: Final = "__dbt_tmp"


def temp_relation(plan: ModelPlan, ordinal: int) -> str:
    """The window's temporary relation for a model, named as dbt-postgres' ``make_temp_relation``.

    dbt appends a timestamp to ``__dbt_tmp``; the model's position in the window does the same
    job here (two models of one window never share a name), and the base name is cut as dbt
    cuts it so the whole stays within :data:`MAX_IDENTIFIER`.
    """
    suffix = f"{TEMP_SUFFIX}{ordinal}"
    return quote_ident(plan.table[: MAX_IDENTIFIER - len(suffix)] + suffix)


def temp_table_sql(plan: ModelPlan, temp: str) -> str:
    """dbt-postgres' ``create_table_as(temporary=True)`` for the window's rows.

    ``on commit drop``: dbt's temporary table lives until its session ends, and each dbt run is
    its own session; the compiled windows share one session, so each window's table goes with
    its transaction and the next window can create it again.
    """
    return f"create temporary table {temp} on commit drop as (\n{plan.compiled_code.rstrip()}\n)"


def delete_insert_sql(plan: ModelPlan, temp: str, columns: Sequence[str]) -> tuple[str, str]:
    """dbt-adapters' ``default__get_delete_insert_merge_sql`` (dbt 1.11): the delete, then the insert.

    Two statements, run in this order. PostgreSQL runs a data-modifying CTE on the same
    snapshot as the statement around it, and may run it after the insert: ``with d as (delete
    ...) insert ...`` fails on the unique index whenever a window's key already exists outside
    the window (a row that moved to another day). dbt sends the delete as its own statement
    first, and so does this.
    """
    keys = ", ".join(plan.unique_key)
    cols = ", ".join(quote_ident(c) for c in columns)
    # SQL from dbt's compiler and the catalog; dbt builds the same statements the same way.
    delete = (
        f"delete from {plan.relation} as DBT_INTERNAL_DEST\n"
        f"where ({keys}) in (\n    select distinct {keys}\n    from {temp} as DBT_INTERNAL_SOURCE\n)"
    )
    insert = f"insert into {plan.relation} ({cols})\n(\n    select {cols}\n    from {temp}\n)"
    return delete, insert


def probe_sql(plan: ModelPlan) -> str:
    """The model's columns for one window, without reading rows."""
    return f"select * from (\n{plan.compiled_code.rstrip()}\n) as model_columns limit 0"


def column_drift(plan: ModelPlan, model_columns: Sequence[str], table_columns: Sequence[str]) -> str | None:
    """Why the model's columns and its table's differ, or None when they match."""
    added = sorted(set(model_columns) - set(table_columns))
    missing = sorted(set(table_columns) - set(model_columns))
    if not added and not missing:
        return None
    parts = [f"new {', '.join(added)}" if added else "", f"gone {', '.join(missing)}" if missing else ""]
    return f"model {plan.name}'s columns differ from {plan.relation} ({'; '.join(p for p in parts if p)})"


# ------------------------------------------------------------------------------------ executing


@dataclass(frozen=True)
class _Prepared:
    plan: ModelPlan
    #: In order: ``(sql, takes_window)``; a statement that takes the window binds ``$1``/``$2``.
    statements: tuple[tuple[str, bool], ...]


#: Checks one window on its open transaction: an error text fails (and rolls back) the window.
Verify = Callable[["psycopg.Connection[Any]", date, date], "str | None"]


class CompiledWindows:
    """A connection and every model's per-window statements, checked against the database.

    The statements go to the server as written, with the window bound to ``$1``/``$2`` as typed
    parameters (psycopg's ``RawCursor``): a ``%`` in a model's SQL stays literal, and no date is
    ever spliced into SQL text. No SQL-level ``PREPARE``, which connection poolers in transaction
    mode cannot carry between transactions; psycopg prepares repeated statements itself (see
    :attr:`PREPARE_THRESHOLD`).

    :meth:`open` raises :class:`NotCompilable` when a table is missing, its columns drifted
    from the model's, or the server rejects a statement: dbt, not this module, decides what to
    do about those.
    """

    #: psycopg's protocol-level prepared statements after this many runs of a statement (its
    #: default); PgBouncer carries those in transaction mode from 1.21 (max_prepared_statements).
    PREPARE_THRESHOLD: int | None = 5

    def __init__(
        self, conn: psycopg.Connection[Any], prepared: Sequence[_Prepared], verify: Verify | None = None
    ) -> None:
        self._conn = conn
        self._prepared = tuple(prepared)
        self._verify = verify

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(p.plan.name for p in self._prepared)

    @classmethod
    def open(
        cls, connect: Mapping[str, str], plans: Sequence[ModelPlan], tenant_id: str | None, verify: Verify | None = None
    ) -> CompiledWindows:
        """Connect with ``connect`` (psycopg keyword arguments) and check ``plans``' statements.

        ``verify`` runs in each window's transaction before it commits: a failure it returns rolls
        the window back (``--verify``, :mod:`dbtbackfill.runner.window_tests`).
        """
        import psycopg
        from psycopg.conninfo import make_conninfo

        conn = psycopg.connect(
            make_conninfo(**connect),
            autocommit=False,
            cursor_factory=psycopg.RawCursor,
            prepare_threshold=cls.PREPARE_THRESHOLD,
        )
        try:
            prepared = [_prepare(conn, plan, tenant_id, n) for n, plan in enumerate(plans)]
            conn.rollback()  # the checks wrote nothing; end their transaction
        except psycopg.Error as e:  # SQL the server rejects: dbt reports it in its own words
            conn.close()
            raise NotCompilable(f"the compiled models could not be prepared: {_pg_message(e)}") from e
        except BaseException:
            conn.close()
            raise
        return cls(conn, prepared, verify)

    def run(self, start: date, end: date) -> tuple[list[tuple[str, int]], str | None]:
        """Replace one window in one transaction: ``[(model, rows inserted)]`` and an error or None.

        On an error the transaction is rolled back, so the window keeps its previous rows;
        the error names the model whose statement failed.
        """
        window = (start, end)
        sent: list[tuple[str, psycopg.Cursor[Any]]] = []
        try:
            # Pipelined: the server runs the window's statements back to back, one sync at commit.
            with self._conn.pipeline():
                for p in self._prepared:
                    for sql, takes_window in p.statements:
                        cur = self._conn.execute(sql.encode(), window if takes_window else None)
                        sent.append((p.plan.name, cur))
                if self._verify is None:
                    self._conn.commit()
            if self._verify is not None:
                failed = self._verify(self._conn, start, end)
                if failed is not None:
                    self._rollback()
                    return [], failed
                self._conn.commit()
        except Exception as e:  # psycopg.Error; statements after the failing one are aborted
            failed = next((name for name, cur in sent if not _succeeded(cur)), "window")
            self._rollback()
            return [], f"{failed}: {_pg_message(e)}"
        # The last statement of each model is its insert.
        rows = {name: max(cur.rowcount, 0) for name, cur in sent}
        return [(p.plan.name, rows[p.plan.name]) for p in self._prepared], None

    def _rollback(self) -> None:
        try:
            self._conn.rollback()
        except Exception:  # a broken connection: the server rolls back as it closes
            self._conn.close()

    def close(self) -> None:
        self._conn.close()


def _prepare(conn: psycopg.Connection[Any], plan: ModelPlan, tenant_id: str | None, ordinal: int) -> _Prepared:
    table_columns = [
        str(row[0])
        for row in conn.execute(
            "select column_name from information_schema.columns"
            " where table_schema = $1 and table_name = $2 order by ordinal_position",
            (plan.schema, plan.table),
        )
    ]
    if not table_columns:
        raise TableMissing(f"table {plan.relation} does not exist yet")
    probe = date(2000, 1, 1)
    with conn.cursor() as cur:
        cur.execute(probe_sql(plan).encode(), (probe, probe))
        model_columns = [c.name for c in cur.description or ()]
    drift = column_drift(plan, model_columns, table_columns)
    if drift is not None:
        raise NotCompilable(drift)
    statements: list[tuple[str, bool]] = []
    for hook in plan.pre_hooks:
        if isinstance(hook, WindowDelete):
            statements.append((window_delete_sql(plan, hook, tenant_id), True))
        else:
            statements.append((hook, False))
    temp = temp_relation(plan, ordinal)
    create = temp_table_sql(plan, temp)
    delete, insert = delete_insert_sql(plan, temp, table_columns)
    statements += [(create, True), (delete, False), (insert, False)]
    window = (probe, probe)
    for sql, takes_window in statements:
        if takes_window:  # planned, not run: a bad column or type fails here
            conn.execute(f"explain {sql}".encode(), window)
    # The delete and the insert read the temporary table: create it empty to check them too
    # (open() rolls this transaction back).
    conn.execute(f"{create} with no data".encode(), window)
    for sql in (delete, insert):
        conn.execute(f"explain {sql}".encode())
    return _Prepared(plan, tuple(statements))


def _succeeded(cur: psycopg.Cursor[Any]) -> bool:
    from psycopg import pq

    result = cur.pgresult
    return result is not None and result.status in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK)


def _pg_message(error: BaseException) -> str:
    """The server's one-line message (no LINE/caret context), else the error's first line."""
    text = str(getattr(getattr(error, "diag", None), "message_primary", None) or error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def compiled_vars(tenant_id: str | None) -> Mapping[str, Any]:
    """The dbt vars that make ``backfill_date_range`` render the window as ``$1``/``$2``."""
    return {"backfill_start_date": PARAM_START, "backfill_end_date": PARAM_END, "tenant_id": tenant_id}
