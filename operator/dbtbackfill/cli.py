"""Command line: the seed's ``run_dbt_backfill`` contract and the ``dbt-backfill`` tool.

Exit codes: 0 every window succeeded; 1 a window (or dbt) failed; 2 bad input or
an unusable environment (nothing was written).
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from importlib import metadata
from typing import TYPE_CHECKING, NoReturn

from dbtbackfill import audit, planner, runner
from dbtbackfill.planner import PlanError, Window
from dbtbackfill.progress import Reporter, print_history

if TYPE_CHECKING:
    import sqlalchemy as sa

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

# dbt selectors: names, paths, tags, graph operators; never quotes, spaces or shell syntax, and
# never a leading "-", which would turn a selector into a runner option (--tenant-id=...).
SELECTOR_RE = re.compile(r"^[A-Za-z0-9_.:+*@/,=][A-Za-z0-9_.:+*@/,=-]{0,199}$")
RECENT_HOURS = 24


class UsageError(Exception):
    """Bad input: reported as one line, exit code 2, nothing written."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage dump: these errors land in Job logs and CI output.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def add_backfill_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--start-date", required=True, help="first day to reprocess (YYYY-MM-DD)")
    parser.add_argument("--end-date", required=True, help="last day to reprocess, inclusive (YYYY-MM-DD)")
    parser.add_argument("--tenant-id", help="reprocess one tenant only; default all tenants")
    parser.add_argument(
        "--models",
        nargs="+",
        default=[],
        metavar="SELECTOR",
        help="dbt selection, e.g. staging+ facts+ (default: the whole project)",
    )
    parser.add_argument("--database-url", help="PostgreSQL URL; overrides $DATABASE_URL")
    parser.add_argument(
        "--chunk",
        choices=planner.CHUNK_UNITS,
        default=None,
        help="split the range into calendar days, ISO weeks or months, run in order",
    )
    parser.add_argument("--chunk-size", type=int, default=1, metavar="N", help="units per chunk (default 1)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and compile only; write nothing")
    parser.add_argument(
        "--allow-recent",
        action="store_true",
        help=f"allow an end date within the last {RECENT_HOURS} hours (data may be incomplete)",
    )
    parser.add_argument("--threads", type=int, default=None, help="dbt threads")
    parser.add_argument(
        "--engine",
        choices=("auto", "dbt"),
        default="auto",
        help="auto (default): when every selected model follows the backfill contract, dbt compiles"
        " them once and each window runs that SQL in one transaction; otherwise, or with dbt,"
        " each window is one in-process dbt run",
    )
    parser.add_argument(
        "--execution-id",
        type=uuid.UUID,
        default=None,
        help="audit row id; a retry with the same id updates that row (used by the operator)",
    )
    parser.add_argument("--parent-id", type=uuid.UUID, default=None, help="audit id of the owning backfill")
    parser.add_argument("--backfill-name", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--backfill-namespace", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--backfill-uid", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--chunk-index", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--attempt", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--verbose", "-v", action="store_true", help="show dbt's own log output")


def _check_recent(end: date, now: datetime) -> None:
    # The window covers end_date through 23:59:59 UTC; any of that inside the last 24 hours
    # may still be arriving, so rewriting it would bake in incomplete data.
    window_end = datetime.combine(end + timedelta(days=1), datetime.min.time(), UTC)
    if window_end > now - timedelta(hours=RECENT_HOURS):
        raise UsageError(
            f"end_date {end} reaches into the last {RECENT_HOURS} hours, whose data may be incomplete; "
            "pass --allow-recent to backfill it anyway"
        )


def plan_from_args(args: argparse.Namespace, now: datetime | None = None) -> tuple[list[Window], str | None]:
    """Validate everything that can be checked without a database. Raises UsageError."""
    try:
        start = planner.parse_date(args.start_date, "start_date")
        end = planner.parse_date(args.end_date, "end_date")
        planner.validate_range(start, end)
        tenant = planner.validate_tenant_id(args.tenant_id)
        planner.validate_unit(args.chunk or "day", args.chunk_size)
        windows = (
            planner.plan_windows(start, end, args.chunk, args.chunk_size) if args.chunk else [Window(0, start, end)]
        )
    except PlanError as exc:
        raise UsageError(str(exc)) from None
    for selector in args.models:
        if not SELECTOR_RE.match(selector):
            raise UsageError(f"model selector {selector!r} has characters dbt selectors never use")
    if args.threads is not None and not 1 <= args.threads <= 64:
        raise UsageError("--threads must be between 1 and 64")
    if not args.allow_recent:
        _check_recent(end, now or datetime.now(UTC))
    return windows, tenant


def resolve_database_url(explicit: str | None) -> str:
    url = explicit or os.environ.get("DATABASE_URL")
    if not url:
        raise UsageError("no database given: set DATABASE_URL or pass --database-url")
    return url


def check_database(url: str) -> None:
    """Fail fast, with one line, on a database we cannot reach."""
    import sqlalchemy as sa

    try:
        with audit.engine_for(url, connect_timeout=5).connect() as conn:
            conn.execute(sa.text("select 1"))
    except Exception as exc:  # any driver error means the same to the user
        first = str(getattr(exc, "orig", exc)).strip().splitlines()
        raise UsageError(f"cannot connect to the database: {first[0] if first else type(exc).__name__}") from None


def run_backfill(argv: Sequence[str] | None = None, prog: str = "run_dbt_backfill") -> int:
    parser = _Parser(prog=prog, description="Reprocess a date range of the dbt project on PostgreSQL.")
    add_backfill_arguments(parser)
    args = parser.parse_args(argv)
    session: runner.DbtSession | None = None
    try:
        windows, tenant = plan_from_args(args)
        url = resolve_database_url(args.database_url)
        runner.dbt_env(url)  # validates the URL's shape before any connection attempt
        check_database(url)
        session = runner.DbtSession(url, threads=args.threads, quiet=not args.verbose)
        session.parse()
        models = session.select_models(args.models)
        reporter = Reporter(windows, models=models, tenant=tenant, dry_run=args.dry_run)
        reporter.plan()
        reporter.parsed(session.parse_report)
        if args.dry_run:
            return _dry_run(session, windows, tenant, args.models, reporter)
        return _execute(args, url, session, windows, tenant, models, reporter)
    except (UsageError, runner.RunnerError) as exc:
        return _fail(prog, str(exc))
    finally:
        if session is not None:
            session.close()


def _dry_run(
    session: runner.DbtSession,
    windows: list[Window],
    tenant: str | None,
    selectors: list[str],
    reporter: Reporter,
) -> int:
    result = session.compile(windows[0], tenant, selectors)
    reporter.dry_run_done(result)
    return EXIT_OK if result.success else EXIT_FAILED


def _execute(
    args: argparse.Namespace,
    url: str,
    session: runner.DbtSession,
    windows: list[Window],
    tenant: str | None,
    models: list[str],
    reporter: Reporter,
) -> int:
    engine = audit.engine_for(url)
    execution_id = args.execution_id or uuid.uuid4()
    audit.ensure_schema(engine)
    audit.record_start(
        engine,
        audit.ExecutionStart(
            id=execution_id,
            start_date=windows[0].start,
            end_date=windows[-1].end,
            tenant_id=tenant,
            models=args.models or models,
            kind="chunk" if args.parent_id else "run",
            parent_id=args.parent_id,
            backfill_name=args.backfill_name,
            backfill_namespace=args.backfill_namespace,
            backfill_uid=args.backfill_uid,
            chunk_index=args.chunk_index,
            attempt=args.attempt,
        ),
    )
    started = time.monotonic()
    with reporter.running():
        try:
            outcome = runner.run_windows(
                session,
                windows,
                tenant_id=tenant,
                selectors=args.models,
                models=models,
                engine=args.engine,
                on_engine=reporter.engine,
                on_window=reporter.window_done,
            )
            error = outcome.error
        except BaseException as exc:  # KeyboardInterrupt/SIGTERM included: never leave a row 'running'
            audit.record_finish(
                engine,
                execution_id,
                "failed",
                duration_seconds=time.monotonic() - started,
                records_processed=None,
                error_message=f"interrupted: {exc!r}",
            )
            raise
    audit.record_finish(
        engine,
        execution_id,
        "completed" if outcome.success else "failed",
        duration_seconds=round(time.monotonic() - started, 3),
        records_processed=outcome.rows,
        error_message=error,
    )
    reporter.summary(outcome, execution_id)
    return EXIT_OK if outcome.success else EXIT_FAILED


def _exit(code: int) -> NoReturn:
    # Tearing down the interpreter walks every object dbt built (manifests, adapters) through
    # the garbage collector: about 0.7 s per process, per Job. Frozen objects are skipped;
    # everything that matters (audit rows, connections, output) is finished by now.
    sys.stdout.flush()
    sys.stderr.flush()
    gc.freeze()
    sys.exit(code)


def main_run_dbt_backfill() -> None:
    _exit(run_backfill(prog="run_dbt_backfill"))


# ---------------------------------------------------------------- dbt-backfill tool


def _audit_engine(args: argparse.Namespace) -> sa.Engine:
    """The audit database of a subcommand; raises UsageError when it is missing or down."""
    url = resolve_database_url(args.database_url)
    check_database(url)
    return audit.engine_for(url)


def _history(args: argparse.Namespace) -> int:
    try:
        engine = _audit_engine(args)
    except UsageError as exc:
        return _fail("dbt-backfill history", str(exc))
    audit.ensure_schema(engine)
    print_history(audit.history(engine, status=args.status, limit=args.limit))
    return EXIT_OK


def _db_upgrade(args: argparse.Namespace) -> int:
    try:
        engine = _audit_engine(args)
    except UsageError as exc:
        return _fail("dbt-backfill db upgrade", str(exc))
    audit.upgrade(engine)
    print(f"audit schema at revision {audit.current_revision(engine)}")
    return EXIT_OK


def _demo_data(args: argparse.Namespace) -> int:
    from dbtbackfill.demo import load_demo_data

    try:
        url = resolve_database_url(args.database_url)
        start = planner.parse_date(args.start_date, "start_date")
        check_database(url)
        counts = load_demo_data(
            url, tenants=args.tenants, start_date=start, days=args.days, rows_per_day=args.rows_per_day
        )
    except (UsageError, PlanError, ValueError) as exc:
        return _fail("dbt-backfill demo-data", str(exc))
    print(
        f"demo data ready: {counts.customers} customers, {counts.orders} orders "
        f"for {args.tenants} tenants from {start} for {args.days} days"
    )
    return EXIT_OK


def _operator(args: argparse.Namespace) -> int:
    from dbtbackfill.operator_main import run_operator

    return run_operator(args)


def _demo(args: argparse.Namespace) -> int:
    from dbtbackfill.localdemo import run_demo

    code: int = run_demo(args.database_url, days=args.days)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dbt-backfill", description="Chunked, audited dbt backfills on PostgreSQL.")
    # The installed distribution's version, so an image or a wheel reports what it really holds.
    parser.add_argument("--version", action="version", version=f"%(prog)s {metadata.version('dbtbackfill')}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="backfill a date range (same as python -m scripts.run_dbt_backfill)")
    add_backfill_arguments(run)

    hist = sub.add_parser("history", help="recent audit rows from backfill_executions")
    hist.add_argument("--status", choices=("running", "completed", "failed", "cancelled"))
    hist.add_argument("--limit", type=int, default=20)
    hist.add_argument("--database-url")
    hist.set_defaults(func=_history)

    db = sub.add_parser("db", help="audit-log schema")
    db_sub = db.add_subparsers(dest="db_command", required=True, parser_class=_Parser)
    up = db_sub.add_parser("upgrade", help="apply the audit-log migrations")
    up.add_argument("--database-url")
    up.set_defaults(func=_db_upgrade)

    demo_data = sub.add_parser("demo-data", help="load deterministic multi-tenant demo data into raw.*")
    demo_data.add_argument("--database-url")
    demo_data.add_argument("--tenants", type=int, default=3)
    demo_data.add_argument("--start-date", required=True)
    demo_data.add_argument("--days", type=int, required=True)
    demo_data.add_argument("--rows-per-day", type=int, default=20)
    demo_data.set_defaults(func=_demo_data)

    demo = sub.add_parser("demo", help="local demo: PostgreSQL, demo data, a chunked backfill, history")
    demo.add_argument("--database-url", help="use this database instead of starting a local one")
    demo.add_argument("--days", type=int, default=90)
    demo.set_defaults(func=_demo)

    op = sub.add_parser("operator", help="run the Kubernetes operator (kopf)")
    scope = op.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[], help="watch this namespace (repeatable)")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch the whole cluster")
    op.add_argument("--liveness-port", type=int, default=8080)
    op.add_argument("--metrics-port", type=int, default=9102)
    op.add_argument("--peering", default=None, help="kopf peering name for HA; default standalone")
    op.add_argument("--log-format", choices=("text", "json"), default="text")
    op.set_defaults(func=_operator)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:
        _exit(run_backfill(argv[1:], prog="dbt-backfill run"))
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
