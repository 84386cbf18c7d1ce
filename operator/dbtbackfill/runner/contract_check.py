"""Lint backfillable models for the contract and the shapes that backfill silently wrong.

A model can compile, run and commit every window and still be wrong: it reads no window (each
window rebuilds it from everything), it reaches the window only through an outer join (each
window rewrites the rows outside it with nulls), or it aggregates or numbers rows over groups
that cross windows (each window restarts the count). This module finds those shapes in what
dbt compiled and what PostgreSQL plans for it, and says how to fix each.

The evidence is the database's own: every model is compiled once with the window as the typed
parameters ``$1``/``$2`` (as the compiled engine does), and ``EXPLAIN`` of its generic plan
shows which scans the window filters and how joins, aggregates and set operations carry that
filter to the model's rows. PostgreSQL 15's plans do not show a window function's
``PARTITION BY``, so that comes from the compiled SQL's tokens (sqlparse, a dbt dependency).

Findings refuse a run (:data:`OVERRIDES` names the flag that allows it anyway) or warn; a model
can silence a finding it has been reviewed for with ``meta: {backfill: {ignore: [code, ...]}}``.
The analysis is pure (plan JSON, SQL text and catalog facts in, findings out); :func:`check`
gathers the facts on one connection and writes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from dbtbackfill.runner.compiled import PARAM_END, PARAM_START, WindowDelete, window_delete_hook

if TYPE_CHECKING:
    import psycopg

NO_WINDOW_FILTER: Final = "no-window-filter"
JOIN_OUTSIDE_WINDOW: Final = "join-outside-window"
ACROSS_WINDOWS: Final = "across-windows"
NOT_INCREMENTAL: Final = "not-incremental"
NO_DELETE_HOOK: Final = "no-delete-hook"
UNIQUE_KEY_INDEX: Final = "unique-key-not-indexed"
WINDOW_COLUMN_INDEX: Final = "window-column-not-indexed"
SQL_ERROR: Final = "sql-error"

ALLOW_FULL_REBUILD: Final = "--allow-full-rebuild"
ALLOW_CROSS_WINDOW: Final = "--allow-cross-window"
#: The findings ``run`` refuses, and the flag that runs them anyway. They give wrong rows
#: without any error; the others cost speed, leave stale rows or fail loudly by themselves.
OVERRIDES: Final[Mapping[str, str]] = {
    NO_WINDOW_FILTER: ALLOW_FULL_REBUILD,
    JOIN_OUTSIDE_WINDOW: ALLOW_CROSS_WINDOW,
    ACROSS_WINDOWS: ALLOW_CROSS_WINDOW,
}


@dataclass(frozen=True)
class Finding:
    model: str
    code: str
    message: str
    fix: str

    @property
    def override(self) -> str | None:
        """The ``run`` flag that allows this finding, or None when ``run`` only warns."""
        return OVERRIDES.get(self.code)

    def line(self) -> str:
        return f"model {self.model}: {self.message} [{self.code}]"


@dataclass(frozen=True)
class Index:
    columns: tuple[str, ...]
    unique: bool = False


@dataclass(frozen=True)
class ModelShape:
    """What the check needs of one compiled model (see :func:`model_shape`)."""

    name: str
    materialized: str
    #: Compiled with the window as ``$1``/``$2`` (``compiled.compiled_vars``), ephemerals inlined.
    compiled_code: str
    schema: str
    table: str
    unique_key: tuple[str, ...] = ()
    #: The ``backfill_delete_window`` pre-hooks' columns.
    window_deletes: tuple[WindowDelete, ...] = ()
    #: The ``indexes`` its config declares (dbt-postgres creates them with the table).
    declared_indexes: tuple[Index, ...] = ()
    ignore: frozenset[str] = frozenset()

    @property
    def reads_window_vars(self) -> bool:
        """It reads backfill_start_date/backfill_end_date itself, not through the macro."""
        return PARAM_START in self.compiled_code or PARAM_END in self.compiled_code

    @property
    def calls_date_range(self) -> bool:
        return "$1::date" in self.compiled_code and "$2::date" in self.compiled_code


@dataclass(frozen=True)
class Scan:
    schema: str
    table: str
    column: str


@dataclass(frozen=True)
class PlanFacts:
    """What a model's generic plan says about the window."""

    #: Some scan (or filter) of the plan compares with ``$1``/``$2``.
    reads_window: bool
    #: Every row the model returns passed such a filter.
    output_windowed: bool
    windowed_columns: frozenset[str] = frozenset()
    windowed_scans: tuple[Scan, ...] = ()
    #: Outer joins through which the window is lost: "left join (rows of raw.customers)".
    lost_joins: tuple[str, ...] = ()
    #: Group keys of aggregates over windowed rows, one string per aggregate ("" = no group by).
    group_keys: tuple[str, ...] = ()
    #: Some window function runs over windowed rows (only then can one restart per window).
    windowed_window_functions: bool = False


# ------------------------------------------------------------------------------ the plan

_PARAM_RE: Final = re.compile(r"\$[12](?![0-9])")
_CONDITIONS: Final = ("Filter", "Index Cond", "Recheck Cond", "One-Time Filter")
_NAME: Final = r'(?:"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)'
# "(orders.ordered_at >= $1)", "(ordered_at < ($2 + 1))": the column compared with the window.
_WINDOW_COLUMN_RE: Final = re.compile(rf"(?:{_NAME}\.)?({_NAME})\s*(?:>=|<|>|<=|=)\s*\(?\s*\$[12](?![0-9])")
_SUBPLAN_RE: Final = re.compile(r"SubPlan \d+")
_NOT_ROWS: Final = ("InitPlan", "SubPlan")
# Functions that turn a timestamp into something coarser than its day.
_COARSER_RE: Final = re.compile(r"\b(date_trunc|date_part|extract|to_char|date_bin|justify_\w+)\s*\(", re.I)
_DAY_TRUNC_RE: Final = re.compile(r"date_trunc\(\s*'day'", re.I)


def _unquote(name: str) -> str:
    return name[1:-1].replace('""', '"') if name.startswith('"') else name


def _children(node: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list(node.get("Plans") or ())


def _walk_all(node: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    yield node
    for child in _children(node):
        yield from _walk_all(child)


def _relations(node: Mapping[str, Any]) -> list[str]:
    names = []
    for n in _walk_all(node):
        if n.get("Relation Name"):
            names.append(f"{n.get('Schema', '')}.{n['Relation Name']}".lstrip("."))
        elif n.get("CTE Name"):
            names.append(str(n["CTE Name"]))
    return sorted(set(names))


class _PlanWalk:
    def __init__(self, root: Mapping[str, Any]) -> None:
        self.subplans = {str(n["Subplan Name"]): n for n in _walk_all(root) if n.get("Subplan Name")}
        self.memo: dict[int, bool] = {}
        self.columns: set[str] = set()
        self.scans: list[Scan] = []
        self.lost: list[str] = []
        self.groups: list[str] = []
        self.windowed_window_aggs = False
        self.any_param = False

    def _subplan(self, name: str) -> bool:
        node = self.subplans.get(name)
        return node is not None and self.windowed(node)

    def windowed(self, node: Mapping[str, Any]) -> bool:
        key = id(node)
        if key not in self.memo:
            self.memo[key] = False  # a guard; plans are trees, CTEs are shared subtrees
            self.memo[key] = self._windowed(node)
        return self.memo[key]

    def _own_filter(self, node: Mapping[str, Any]) -> bool:
        own = False
        for cond in (str(node[k]) for k in _CONDITIONS if node.get(k)):
            if _PARAM_RE.search(cond):
                own = True
                self.any_param = True
                cols = [_unquote(m) for m in _WINDOW_COLUMN_RE.findall(cond)]
                self.columns.update(cols)
                if node.get("Relation Name"):
                    schema, table = str(node.get("Schema", "")), str(node["Relation Name"])
                    self.scans.extend(Scan(schema, table, c) for c in cols)
            # "x in (select ... windowed)": a filter by a windowed subplan keeps windowed rows.
            if any(self._subplan(name) for name in _SUBPLAN_RE.findall(cond)):
                own = True
        return own

    def _windowed(self, node: Mapping[str, Any]) -> bool:
        own = self._own_filter(node)
        rows = [c for c in _children(node) if c.get("Parent Relationship") not in _NOT_ROWS]
        sides = {str(c.get("Parent Relationship")): self.windowed(c) for c in rows}
        kind = str(node.get("Node Type", ""))
        join = node.get("Join Type")
        if kind == "CTE Scan":
            inner = self._subplan(f"CTE {node.get('CTE Name')}")
        elif join is not None:
            outer_w, inner_w = sides.get("Outer", False), sides.get("Inner", False)
            inner = {
                "Inner": outer_w or inner_w,
                "Semi": outer_w or inner_w,
                "Right Semi": outer_w or inner_w,
                "Left": outer_w,
                "Anti": outer_w,
                "Right": inner_w,
                "Right Anti": inner_w,
                "Full": outer_w and inner_w,
            }.get(str(join), outer_w and inner_w)
            if not inner and not own and (outer_w or inner_w):
                kept = next(
                    (c for c in rows if c.get("Parent Relationship") == ("Inner" if "Right" in join else "Outer")),
                    None,
                )
                where = f" (rows of {', '.join(_relations(kept))})" if kept is not None else ""
                self.lost.append(f"{str(join).lower()} join{where}")
        elif kind in ("Append", "Merge Append", "Recursive Union", "SetOp"):
            inner = bool(rows) and all(self.windowed(c) for c in rows)
        else:
            inner = any(self.windowed(c) for c in rows)
        if kind in ("Aggregate", "Group") and any(self.windowed(c) for c in rows):
            keys = node.get("Group Key") or [
                k for s in node.get("Grouping Sets") or () for k in s.get("Group Keys", ())
            ]
            self.groups.append(", ".join(str(k) for k in keys))
        if kind == "WindowAgg" and any(self.windowed(c) for c in rows):
            self.windowed_window_aggs = True
        return own or inner


def plan_facts(explain: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> PlanFacts:
    """The window's path through ``EXPLAIN (VERBOSE, FORMAT JSON)`` of a generic plan."""
    top = explain[0] if isinstance(explain, Sequence) else explain
    root = top["Plan"]
    walk = _PlanWalk(root)
    windowed = walk.windowed(root)
    for name in walk.subplans:  # scalar subqueries and unreferenced CTEs: their facts count too
        walk._subplan(name)
    return PlanFacts(
        reads_window=walk.any_param or windowed,
        output_windowed=windowed,
        windowed_columns=frozenset(walk.columns),
        windowed_scans=tuple(dict.fromkeys(walk.scans)),
        lost_joins=tuple(dict.fromkeys(walk.lost)),
        group_keys=tuple(dict.fromkeys(walk.groups)),
        windowed_window_functions=walk.windowed_window_aggs,
    )


def day_aligned(expression: str, columns: frozenset[str] | set[str]) -> bool:
    """Whether ``expression`` refers to a window column at day grain (so a group lies in one window)."""
    if _COARSER_RE.search(expression) and not _DAY_TRUNC_RE.search(expression):
        return False
    for col in columns:
        quoted = '"' + col.replace('"', '""') + '"'
        if re.search(rf'(?<![A-Za-z0-9_$"]){re.escape(col)}(?![A-Za-z0-9_$"])', expression) or quoted in expression:
            return True
    return False


# ------------------------------------------------------------------- window functions (SQL)


@dataclass(frozen=True)
class WindowCall:
    function: str
    #: The ``PARTITION BY`` list as written, "" when there is none.
    partition: str
    clause: str


def _significant_tokens(sql: str) -> list[str]:
    import sqlparse
    from sqlparse import tokens as T

    lexed = sqlparse.lexer.tokenize(sql)  # type: ignore[no-untyped-call]
    return [v for tt, v in lexed if tt not in T.Whitespace and tt not in T.Comment]


def _text(tokens: Sequence[str]) -> str:
    text = re.sub(r"\s+([,)])", r"\1", " ".join(tokens))
    return re.sub(r"\s*(::|\.)\s*", r"\1", re.sub(r"\(\s+", "(", text))


def _closing(tokens: Sequence[str], start: int) -> int:
    """The index of the ``)`` that closes the ``(`` at ``start``."""
    depth = 0
    for i in range(start, len(tokens)):
        depth += tokens[i] == "("
        depth -= tokens[i] == ")"
        if depth == 0:
            return i
    return len(tokens) - 1


def _partition(clause: Sequence[str]) -> str:
    """The PARTITION BY list of a window definition's tokens (without its parentheses)."""
    low = [t.lower() for t in clause]
    depth, begin = 0, None
    for i, tok in enumerate(low):
        if depth == 0 and begin is None and tok == "partition" and low[i + 1 : i + 2] == ["by"]:
            begin = i + 2
        elif depth == 0 and begin is not None and i >= begin:
            ends = tok in ("order by", "rows", "range", "groups", "exclude")
            if ends or (tok == "order" and low[i + 1 : i + 2] == ["by"]):
                return _text(clause[begin:i])
        depth += tok == "("
        depth -= tok == ")"
    return "" if begin is None else _text(clause[begin:])


def window_calls(sql: str) -> list[WindowCall]:
    """Every ``f(...) over (...)`` / ``over name`` in ``sql``, with its PARTITION BY."""
    tokens = _significant_tokens(sql)
    named: dict[str, list[str]] = {}
    for i, tok in enumerate(tokens[:-3]):
        if tok.lower() == "window":
            j = i + 1
            while j + 2 < len(tokens) and tokens[j + 1].lower() == "as" and tokens[j + 2] == "(":
                end = _closing(tokens, j + 2)
                named[tokens[j].lower()] = tokens[j + 3 : end]
                j = end + 2 if end + 1 < len(tokens) and tokens[end + 1] == "," else len(tokens)
    calls = []
    for i, tok in enumerate(tokens):
        if tok.lower() != "over" or i + 1 >= len(tokens):
            continue
        if tokens[i + 1] == "(":
            end = _closing(tokens, i + 1)
            body = tokens[i + 2 : end]
        else:
            body = named.get(tokens[i + 1].lower(), [])
        function = "window function"
        if i > 0 and tokens[i - 1] == ")":
            depth, j = 0, i - 1
            while j >= 0:
                depth += tokens[j] == ")"
                depth -= tokens[j] == "("
                if depth == 0:
                    break
                j -= 1
            if j > 0:
                function = tokens[j - 1] + "()"
        calls.append(WindowCall(function, _partition(body), f"over ({_text(body)})"))
    return calls


# ------------------------------------------------------------------------------ findings

_FIX_DATE_RANGE: Final = (
    "filter every source it reads with {{ backfill_date_range(var('backfill_start_date'),"
    " var('backfill_end_date'), var('tenant_id'), date_column='...') }} (or read a windowed ephemeral model);"
    " if it must rebuild from all rows, leave it out of --models or pass --allow-full-rebuild"
)


def _covered(indexes: Sequence[Index], key: Sequence[str]) -> bool:
    """A unique index on some of the key's columns makes the key unique."""
    return any(ix.unique and ix.columns and set(ix.columns) <= set(key) for ix in indexes)


def _leads(indexes: Sequence[Index], column: str) -> bool:
    return any(ix.columns[:1] == (column,) for ix in indexes)


def findings(
    shape: ModelShape,
    plan: PlanFacts | None,
    *,
    table_indexes: Sequence[Index] | None = None,
    input_indexes: Mapping[tuple[str, str], Sequence[Index]] | None = None,
) -> list[Finding]:
    """The contract's and the traps' findings for one model (ephemeral models have none of their own).

    ``plan`` is None when the model's plan could not be checked (a relation it reads does not
    exist yet); ``table_indexes`` is None when its table does not exist yet.
    """
    if shape.materialized == "ephemeral":
        return []
    out: list[Finding] = []

    def add(code: str, message: str, fix: str) -> None:
        if code not in shape.ignore:
            out.append(Finding(shape.name, code, message, fix))

    reads_window = shape.calls_date_range or shape.reads_window_vars or (plan is not None and plan.reads_window)
    if shape.materialized in ("table", "incremental") and not reads_window:
        add(
            NO_WINDOW_FILTER,
            "never reads the window (no backfill_date_range in it or its ephemeral inputs):"
            " every window rebuilds it from all rows",
            _FIX_DATE_RANGE,
        )
    if shape.materialized not in ("incremental",) and reads_window:
        add(
            NOT_INCREMENTAL,
            f"is materialized as {shape.materialized} and reads the window: each window replaces"
            " the whole relation with that window's rows",
            "make it incremental with incremental_strategy='delete+insert', a unique_key and a"
            " backfill_delete_window pre-hook",
        )
    if plan is not None and reads_window:
        if plan.lost_joins and not plan.output_windowed:
            add(
                JOIN_OUTSIDE_WINDOW,
                f"reads the window only through a {' and a '.join(plan.lost_joins)}: every window"
                " rewrites the rows outside it, with nulls for what the window did not read",
                "filter the side whose rows it keeps with backfill_date_range too, or make the join an inner join",
            )
        for keys in plan.group_keys:
            if not day_aligned(keys, plan.windowed_columns):
                what = f"group by {keys}" if keys else "an aggregate with no group by"
                add(
                    ACROSS_WINDOWS,
                    f"aggregates windowed rows over groups that cross windows ({what}):"
                    " every window replaces the totals with that window's part",
                    "group by the window's day too (e.g. the window column cast to date), or compute the"
                    " total from an unwindowed input in a model outside the backfill",
                )
        # The plan says whether any window function reads windowed rows; the SQL says which partition.
        for call in window_calls(shape.compiled_code) if plan.windowed_window_functions else ():
            if not day_aligned(call.partition, plan.windowed_columns):
                add(
                    ACROSS_WINDOWS,
                    f"{call.function} {call.clause} runs over windowed rows whose partition crosses windows:"
                    " it restarts in every window",
                    "partition by the window's day too, or compute it in a model that reads all rows",
                )
    if shape.materialized == "incremental":
        if not shape.window_deletes:
            add(
                NO_DELETE_HOOK,
                "has no backfill_delete_window pre-hook: rows that left the window at the source stay",
                "add pre_hook=\"{{ backfill_delete_window('<window column>') }}\" to its config",
            )
        # dbt creates declared indexes only with the table: once it exists, the catalog is the truth.
        indexes = list(shape.declared_indexes if table_indexes is None else table_indexes)
        if shape.unique_key and not _covered(indexes, shape.unique_key):
            add(
                UNIQUE_KEY_INDEX,
                f"has unique_key ({', '.join(shape.unique_key)}) without a unique index on"
                f" {shape.schema}.{shape.table}: every window's delete+insert scans the table,"
                " and nothing stops duplicate keys",
                f"declare indexes=[{{'columns': {list(shape.unique_key)}, 'unique': true}}] in its config"
                " (or create the index)",
            )
        for hook in shape.window_deletes:
            if not _leads(indexes, hook.date_column):
                add(
                    WINDOW_COLUMN_INDEX,
                    f"deletes each window by {hook.date_column} with no index on {shape.schema}.{shape.table}"
                    f" leading with it: every window scans the table",
                    f"declare indexes=[{{'columns': ['{hook.date_column}']}}] in its config (or create the index)",
                )
    if plan is not None and input_indexes is not None:
        for scan in plan.windowed_scans:
            known = input_indexes.get((scan.schema, scan.table))
            if known is not None and not _leads(known, scan.column):
                add(
                    WINDOW_COLUMN_INDEX,
                    f"reads {scan.schema}.{scan.table} by its window column {scan.column}, which no index leads with:"
                    " every window scans the whole input",
                    f"create index on {scan.schema}.{scan.table} ({scan.column})",
                )
    return out


def sql_error(shape: ModelShape, message: str) -> Finding:
    return Finding(
        shape.name,
        SQL_ERROR,
        f"its compiled SQL fails EXPLAIN: {message}",
        "fix the column or relation named (a backfill_date_range date_column must be a column of what it filters)",
    )


# ------------------------------------------------------------------------------ gathering


def model_shape(node: Any) -> ModelShape:
    """The check's view of a compiled dbt model node (``runner.DbtSession.compile_params``)."""
    config = node.config
    key = config.unique_key
    meta = (config.get("meta") or {}).get("backfill") or {}
    ignore = meta.get("ignore") or () if isinstance(meta, Mapping) else ()
    deletes = [window_delete_hook(h.sql) for h in config.pre_hook]
    return ModelShape(
        name=node.name,
        materialized=str(config.materialized),
        compiled_code=node.compiled_code or "",
        schema=node.schema,
        table=node.alias,
        unique_key=(key,) if isinstance(key, str) else tuple(key or ()),
        window_deletes=tuple(d for d in deletes if d is not None),
        declared_indexes=tuple(
            Index(tuple(ix.get("columns") or ()), bool(ix.get("unique"))) for ix in config.get("indexes") or ()
        ),
        ignore=frozenset(str(code) for code in ignore),
    )


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    #: Why a model's plan was not checked (one line each).
    notes: list[str] = field(default_factory=list)
    checked: int = 0

    @property
    def refusals(self) -> list[Finding]:
        return [f for f in self.findings if f.override is not None]

    @property
    def sql_errors(self) -> list[Finding]:
        return [f for f in self.findings if f.code == SQL_ERROR]


_INDEXES_SQL: Final = """
select i.indisunique, array(
    select a.attname::text from unnest(i.indkey::int2[]) with ordinality k(attnum, n)
    join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.attnum order by k.n)
from pg_index i
where i.indrelid = to_regclass($1)
"""


def _quoted(schema: str, table: str) -> str:
    return '"' + schema.replace('"', '""') + '"."' + table.replace('"', '""') + '"'


def _indexes(conn: psycopg.Connection[Any], schema: str, table: str) -> list[Index] | None:
    """The table's indexes on plain columns, or None when it does not exist."""
    [(exists,)] = conn.execute("select to_regclass($1) is not null", (_quoted(schema, table),)).fetchall()
    if not exists:
        return None
    rows = conn.execute(_INDEXES_SQL, (_quoted(schema, table),)).fetchall()
    return [Index(tuple(cols), bool(unique)) for unique, cols in rows]


def explain_generic(conn: psycopg.Connection[Any], sql: str, name: str) -> Any:
    """``EXPLAIN (VERBOSE, FORMAT JSON)`` of ``sql``'s generic plan, with ``$1``/``$2`` as dates.

    PostgreSQL 15 has no ``EXPLAIN (GENERIC_PLAN)``: a statement prepared as ``name`` with
    ``plan_cache_mode = force_generic_plan`` keeps the parameters visible in the plan. Prepared
    statements outlive a rollback, so it is deallocated here; the caller owns the transaction.
    """
    conn.execute("set local plan_cache_mode = force_generic_plan")
    conn.execute(f"prepare {name} (date, date) as {sql}".encode())
    try:
        [(plan,)] = conn.execute(f"explain (verbose, format json) execute {name} (null, null)").fetchall()
    except BaseException:
        conn.rollback()  # the transaction is aborted: end it before letting the statement go
        conn.execute(f"deallocate {name}")
        raise
    conn.execute(f"deallocate {name}")
    return plan


def check(connect: Mapping[str, str], nodes: Sequence[Any]) -> Report:
    """Check compiled model ``nodes`` against the database ``connect`` names; writes nothing."""
    import psycopg
    from psycopg.conninfo import make_conninfo

    from dbtbackfill.runner.compiled import _pg_message

    report = Report()
    shapes = [model_shape(n) for n in nodes]
    with psycopg.connect(
        make_conninfo(**connect),  # the target's application_name, as every connection of a run
        cursor_factory=psycopg.RawCursor,
        autocommit=False,
    ) as conn:
        conn.execute("set transaction read only")
        input_indexes: dict[tuple[str, str], Sequence[Index]] = {}
        for n, shape in enumerate(shapes):
            if shape.materialized == "ephemeral":
                continue
            report.checked += 1
            plan: PlanFacts | None = None
            if shape.reads_window_vars:
                report.notes.append(
                    f"model {shape.name}: plan not checked: it reads backfill_start_date/backfill_end_date itself"
                )
            else:
                try:
                    with conn.transaction():  # a savepoint: an error leaves the check's transaction usable
                        plan = plan_facts(explain_generic(conn, shape.compiled_code, f"dbt_backfill_check_{n}"))
                except psycopg.errors.UndefinedTable as e:
                    report.notes.append(f"model {shape.name}: plan not checked: {_pg_message(e)} (yet)")
                except psycopg.Error as e:
                    report.findings.append(sql_error(shape, _pg_message(e)))
            if plan is not None:
                for scan in plan.windowed_scans:
                    if (scan.schema, scan.table) not in input_indexes:
                        input_indexes[(scan.schema, scan.table)] = _indexes(conn, scan.schema, scan.table) or []
            report.findings += findings(
                shape,
                plan,
                table_indexes=_indexes(conn, shape.schema, shape.table),
                input_indexes=input_indexes,
            )
        conn.rollback()
    return report
