"""Command line: the seed's ``run_dbt_backfill`` contract and the ``dbt-backfill`` tool.

Exit codes: 0 every window succeeded; 1 a window (or dbt) failed; 2 bad input or
an unusable environment (nothing was written); 3 a run refused before it touched any data, which
would be refused again however often it ran (recorded as a failed execution when it has an
``--execution-id``: see :class:`Refusal`); 130/143 stopped by SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import re
import signal
import sys
import time
import traceback
import uuid
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from dbtbackfill.core import audit, cost, database_url, planner
from dbtbackfill.core.database_url import DatabaseUrlError
from dbtbackfill.core.planner import PlanError, Window
from dbtbackfill.operator import jobs
from dbtbackfill.operator.jobs import AUDIT_URL_ENV
from dbtbackfill.runner import contract_check, cost_estimate, lifecycle
from dbtbackfill.runner import session as runner
from dbtbackfill.runner.compiled import NotCompilable
from dbtbackfill.runner.invocation import RunnerError, connection_settings
from dbtbackfill.runner.phase_timings import PhaseTimings
from dbtbackfill.runner.progress import Reporter, print_history
from dbtbackfill.runner.project import (
    GENERATED_TARGET,
    ProjectError,
    find_project_dir,
    other_database,
    read_project,
    write_generated_profile,
)
from dbtbackfill.runner.results import BackfillOutcome, WindowResult
from dbtbackfill.runner.window_tests import WindowTests

if TYPE_CHECKING:
    import sqlalchemy as sa

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
# Refused for good: the operator fails such a chunk at once instead of retrying it (a Job
# podFailurePolicy rule, see jobs.py), while 1 and 2 (a database that was unreachable) retry.
EXIT_REFUSED = jobs.EXIT_REFUSED

# dbt selectors: names, paths, tags, graph operators; never quotes, spaces or shell syntax, and
# never a leading "-", which would turn a selector into a runner option (--tenant-id=...).
SELECTOR_RE = re.compile(r"^[A-Za-z0-9_.:+*@/,=][A-Za-z0-9_.:+*@/,=-]{0,199}$")
RECENT_HOURS = 24


class UsageError(Exception):
    """Bad input: reported as one line, exit code 2, nothing written."""


class Refusal(UsageError):
    """A well-formed run the runner will not start: the contract check refused a model, or a
    microbatch model under ``--tenant-id``. One line and no data touched, like bad input, but
    exit code 3: it would be refused again on every retry. The run was real (an operator chunk,
    say), so with ``--execution-id`` its audit row records it as failed with this text, where
    ``history`` and the operator's status find why."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage dump: these errors land in Job logs and CI output.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _fail(prog: str, message: str, code: int = EXIT_USAGE) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


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
        "--project-dir",
        help="the dbt project (default: $DBT_PROJECT_DIR, else the working directory if it is one, else ./analytics)",
    )
    parser.add_argument(
        "--profiles-dir",
        help="directory of the profiles.yml to use (default: $DBT_PROFILES_DIR, else the project's, the working"
        " directory's or ~/.dbt's if it defines the project's profile, else one generated from the database URL)",
    )
    parser.add_argument("--target", help="dbt target of the profile (default: $DBT_TARGET, else the profile's)")
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
        contract_check.ALLOW_FULL_REBUILD,
        action="store_true",
        help="run models that never read the window (each window then rebuilds them from all rows)",
    )
    parser.add_argument(
        contract_check.ALLOW_CROSS_WINDOW,
        action="store_true",
        help="run models whose rows depend on other windows (an outer join onto the window, an aggregate"
        " or window function over groups that cross windows); see dbt-backfill check",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="run the selected models' data tests on each window's rows before it counts as done"
        " (compiled engine: inside the window's transaction, so a failure rolls it back)",
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
    # (Compared through its first instant, not end + 1 day: that overflows for 9999-12-31.)
    window_start = datetime.combine(end, datetime.min.time(), UTC)
    if window_start > now - timedelta(hours=RECENT_HOURS) - timedelta(days=1):
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


def resolve_audit_url(database_url: str) -> str:
    """Where the audit row goes: ``$DBT_BACKFILL_AUDIT_URL`` when the audit log lives in its own
    database (the operator sets it on chunk Jobs from a Secret), else the warehouse itself."""
    return os.environ.get(AUDIT_URL_ENV) or database_url


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
    timings = PhaseTimings.from_env()  # DBT_BACKFILL_TIMINGS=1: one JSON line of phase times at the end
    timings.mark("main")
    session: runner.DbtSession | None = None
    try:
        windows, tenant = plan_from_args(args)
        url = resolve_database_url(args.database_url)
        connection_settings(url)  # the URL's shape and parameters, before any connection attempt
        check_database(url)
        audit_url = resolve_audit_url(url)
        if audit_url != url:
            check_database(audit_url)
        timings.mark("connected")
        if timings.enabled:  # dbt's import timed on its own; parse() would import it first thing anyway
            import dbt.cli.main  # noqa: F401
        timings.mark("dbt_imported")
        session = runner.DbtSession(
            url,
            project_dir=args.project_dir,
            profiles_dir=args.profiles_dir,
            target=args.target,
            threads=args.threads,
            quiet=not args.verbose,
        )
        session.parse()
        timings.mark("parsed")
        models = session.select_models(args.models)
        reporter = Reporter(windows, models=models, tenant=tenant, dry_run=args.dry_run)
        try:
            micro = session.microbatch_models(models)
            if tenant and micro:
                raise Refusal(
                    f"microbatch model(s) {', '.join(micro)} replace whole batches for every tenant: backfill them"
                    " without --tenant-id, or leave them out of --models"
                )
            reporter.target(session.data_target, other_database(session.data_target, url))
            reporter.plan()
            reporter.parsed(session.parse_report)
            _check_contract(args, url, session, models, tenant)
        except Refusal as exc:
            if args.execution_id is not None and not args.dry_run:  # a dry run writes nothing, ever
                start = _execution_start(args, session, windows, tenant, models)
                raise Refusal(_record_refusal(audit_url, start, str(exc))) from None
            raise
        verify = session.window_tests(tenant, models) if args.verify else None
        if verify is not None:
            scoped = len({t.model for t in verify.tests})
            print(f"verify: {len(verify.tests)} data test(s) of {scoped} model(s), per window", file=sys.stderr)
        if args.dry_run:
            reporter.engine(runner.describe_engine(session, tenant, models, args.engine, len(windows)))
            estimate = _cost(session, audit_url, windows, tenant, models, args.models or models)
            reporter.cost(estimate)
            return _dry_run(args, audit_url, session, windows, tenant, models, reporter, estimate)
        timings.mark("planned")
        try:
            return _execute(args, audit_url, session, windows, tenant, models, reporter, verify, timings)
        finally:
            if verify is not None:
                verify.close()
    except Refusal as exc:
        return _fail(prog, str(exc), EXIT_REFUSED)
    except (UsageError, RunnerError) as exc:
        return _fail(prog, str(exc))
    except Exception as exc:  # a bug or an environment we did not foresee: still one line
        return _unexpected(prog, exc, verbose=args.verbose)
    finally:
        if session is not None:
            session.close()
        timings.mark("closed")
        timings.report()


def _unexpected(prog: str, exc: Exception, *, verbose: bool) -> int:
    if verbose:
        traceback.print_exc()
    hint = "" if verbose else " (run with --verbose for the traceback)"
    print(f"{prog}: error: {type(exc).__name__}: {lifecycle.first_line(exc)}{hint}", file=sys.stderr)
    return EXIT_FAILED


def _contract_report(
    session: runner.DbtSession, url: str, models: Sequence[str], tenant: str | None
) -> contract_check.Report:
    """The contract check of ``models`` (compiled once with the window as parameters).

    Microbatch models are dbt's own contract: dbt filters their inputs by ``event_time`` for each
    batch, so they never call ``backfill_date_range`` and are not checked against it.
    """
    micro = session.microbatch_models(models)
    contract_models = [m for m in models if m not in micro]
    notes = [f"model {m}: microbatch: dbt windows it by event_time; not checked" for m in micro]
    if not contract_models:
        return contract_check.Report(notes=notes)
    nodes = session.compile_params(tenant, contract_models)
    report = contract_check.check(session.connect_args(), nodes)
    report.notes[:0] = notes
    return report


def _check_contract(
    args: argparse.Namespace, url: str, session: runner.DbtSession, models: Sequence[str], tenant: str | None
) -> None:
    """Warn about every finding; raise UsageError for the silently wrong ones not allowed by a flag.

    A dry run also fails on SQL the database rejects (a date_column that does not exist).
    """
    try:
        report = _contract_report(session, url, models, tenant)
    except NotCompilable as exc:  # dbt's own run of each window will report it in full
        print(f"warning: the backfill contract was not checked: {exc}", file=sys.stderr)
        return
    allowed = {flag for flag in OVERRIDE_FLAGS if getattr(args, flag[2:].replace("-", "_"))}
    refused = [f for f in report.refusals if f.override not in allowed]
    for finding in report.findings:
        if finding not in refused:
            print(f"warning: {finding.line()}", file=sys.stderr)
    if refused:
        flags = " / ".join(sorted({str(f.override) for f in refused}))
        raise Refusal(f"{'; '.join(f.line() for f in refused)}; nothing was run (pass {flags} to run it anyway)")
    if args.dry_run and report.sql_errors:
        raise UsageError("; ".join(f.line() for f in report.sql_errors))


OVERRIDE_FLAGS: tuple[str, ...] = tuple(sorted(set(contract_check.OVERRIDES.values())))


def _cost(
    session: runner.DbtSession,
    audit_url: str,
    windows: list[Window],
    tenant: str | None,
    models: Sequence[str],
    recorded: Sequence[str],
) -> cost.CostReport:
    """Each window's source rows (planner estimates) and the ETA from the audit log's past chunks
    of the same models (``recorded``: the models as runs record them). Reads only."""
    import sqlalchemy as sa

    micro = set(session.microbatch_models(models))
    try:
        nodes = session.compile_params(tenant, [m for m in models if m not in micro])
        report = cost_estimate.window_estimates(session.connect_args(), nodes, windows)
    except NotCompilable as exc:
        report = cost.CostReport(tuple(cost.WindowCost(w, {}) for w in windows), notes=(f"not estimated: {exc}",))
    try:
        history = cost.History(*audit.chunk_durations(audit.engine_for(audit_url), recorded))
    except sa.exc.DBAPIError:  # no audit table yet (nothing ever ran here): no history
        history = cost.History()
    return dataclasses.replace(report, history=history)


def _dry_run(
    args: argparse.Namespace,
    audit_url: str,
    session: runner.DbtSession,
    windows: list[Window],
    tenant: str | None,
    models: list[str],
    reporter: Reporter,
    estimate: cost.CostReport,
) -> int:
    started = time.monotonic()
    result = session.compile(windows[0], tenant, args.models)
    reporter.dry_run_done(result)
    if args.execution_id is not None:  # an operator chunk: its estimate goes where the operator reads it
        start = dataclasses.replace(_execution_start(args, session, windows, tenant, models), dry_run=True)
        _record_estimate(audit_url, start, result, round(time.monotonic() - started, 3), estimate.total_rows)
    return EXIT_OK if result.success else EXIT_FAILED


def _record_estimate(
    audit_url: str, start: audit.ExecutionStart, result: WindowResult, seconds: float, rows: int
) -> None:
    """A dry run's audit row: ``completed`` (or ``failed``: the compile failed), 0 records, and
    its estimated source rows. Only the audit table is written, never data; a row that cannot be
    written is said in one line and leaves the dry run's outcome as it was."""
    status: audit.Status = "completed" if result.success else "failed"
    try:
        engine = audit.engine_for(audit_url)
        audit.ensure_schema(engine)
        audit.record_start(engine, start)
        audit.record_finish(
            engine, start.id, status, duration_seconds=seconds, records_processed=0,
            error_message=None if result.success else result.error, estimated_source_rows=rows,
        )  # fmt: skip
    except Exception as exc:  # the estimate was printed; the status summary will miss this cell
        print(f"warning: the dry run's estimate was not recorded in audit row {start.id}: "
              f"{lifecycle.first_line(exc)}", file=sys.stderr)  # fmt: skip


def _execute(
    args: argparse.Namespace,
    audit_url: str,
    session: runner.DbtSession,
    windows: list[Window],
    tenant: str | None,
    models: list[str],
    reporter: Reporter,
    verify: WindowTests | None,
    timings: PhaseTimings,
) -> int:
    import sqlalchemy as sa

    engine = audit.engine_for(audit_url)
    start = _execution_start(args, session, windows, tenant, models)
    execution_id = start.id
    try:
        audit.ensure_schema(engine)
        audit.record_start(engine, start)
    except audit.ExecutionConflict as exc:
        raise UsageError(f"--execution-id: {exc}; use a new id for a new run") from None
    except sa.exc.DBAPIError as exc:  # a read-only role, say: nothing can be recorded, so nothing runs
        raise UsageError(f"cannot write the audit log backfill_executions: {lifecycle.first_line(exc)}") from None
    timings.mark("audit_started")
    started = time.monotonic()
    done: list[WindowResult] = []
    outcome: BackfillOutcome | None = None
    crash = ""
    with (
        reporter.running(),
        lifecycle.Heartbeat(engine, execution_id) as heartbeat,
        lifecycle.stop_on_signals() as stop,
    ):

        def window_done(result: WindowResult) -> None:
            done.append(result)
            heartbeat.beat()
            reporter.window_done(result)

        def engine_chosen(text: str) -> None:
            timings.mark("engine")  # with the compiled engine: after its one dbt compile and PREPAREs
            reporter.engine(text)

        try:
            outcome = runner.run_windows(
                session,
                windows,
                tenant_id=tenant,
                selectors=args.models,
                models=models,
                engine=args.engine,
                on_engine=engine_chosen,
                on_window=window_done,
                on_microbatch=reporter.microbatch_done,
                verify=verify,
            )
        except KeyboardInterrupt:  # SIGTERM or Ctrl-C outside dbt, which reports its own as a failure
            stop.signum = stop.signum or signal.SIGINT
        except Exception as exc:  # the database went away under the runner itself, say
            crash = f"{type(exc).__name__}: {lifecycle.first_line(exc)}"
            if args.verbose:
                traceback.print_exc()
    timings.mark("windows")
    seconds = round(time.monotonic() - started, 3)
    rows = sum(w.rows for w in done)
    if stop.signum is not None:
        message = f"cancelled by {stop.name} after {sum(w.success for w in done)}/{len(windows)} window(s)"
        finished = _record_finish(engine, execution_id, "cancelled", seconds, rows, message)
        reporter.cancelled(message, execution_id)
        return stop.exit_code if finished else EXIT_FAILED
    if outcome is None:
        _record_finish(engine, execution_id, "failed", seconds, rows, crash)
        print(f"error: the run stopped: {crash}", file=sys.stderr)
        return EXIT_FAILED
    status: audit.Status = "completed" if outcome.success else "failed"
    finished = _record_finish(engine, execution_id, status, seconds, outcome.rows, outcome.error)
    reporter.summary(outcome, execution_id)
    return EXIT_OK if outcome.success and finished else EXIT_FAILED


def _execution_start(
    args: argparse.Namespace,
    session: runner.DbtSession,
    windows: list[Window],
    tenant: str | None,
    models: list[str],
) -> audit.ExecutionStart:
    """The audit row this run writes first (a new id unless ``--execution-id`` names it)."""
    return audit.ExecutionStart(
        id=args.execution_id or uuid.uuid4(),
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
        target=session.data_target.as_dict(),
    )


def _record_refusal(audit_url: str, start: audit.ExecutionStart, message: str) -> str:
    """Record a refused run as a failed execution (0 rows, ``message`` its error); no data is touched.

    Returns the line to print: ``message``, plus why its row is missing when it could not be written.
    """
    engine = audit.engine_for(audit_url)
    try:
        audit.ensure_schema(engine)
        audit.record_start(engine, start)
        audit.record_finish(
            engine, start.id, "failed", duration_seconds=0.0, records_processed=0, error_message=message
        )
    except Exception as exc:  # the refusal is the news; a row that cannot be written only adds to it
        return f"{message} (its audit row {start.id} was not written: {lifecycle.first_line(exc)})"
    return message


def _record_finish(
    engine: sa.Engine,
    execution_id: uuid.UUID,
    status: audit.Status,
    seconds: float,
    records: int | None,
    error: str | None,
) -> bool:
    """Close the audit row; False (with one line said) when the database is gone."""
    try:
        audit.record_finish(
            engine, execution_id, status, duration_seconds=seconds, records_processed=records, error_message=error
        )
    except Exception as exc:  # any driver error: the database went away during the run
        print(
            f"error: the run ended {status} but its audit row {execution_id} could not be closed "
            f"({lifecycle.first_line(exc)}); history shows it as abandoned once its heartbeat is stale",
            file=sys.stderr,
        )
        return False
    return True


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


def _audit_engine(explicit_url: str | None) -> sa.Engine:
    """The audit database of a subcommand; raises UsageError when it is missing or down."""
    url = resolve_database_url(explicit_url)
    database_url.parse(url)  # the URL's own faults first, before blaming the connection
    check_database(url)
    return audit.engine_for(url)


def _history(args: argparse.Namespace) -> int:
    return show_history(args.database_url, status=args.status, limit=args.limit)


def show_history(url: str | None, *, status: str | None, limit: int, backfill: tuple[str, str] | None = None) -> int:
    """Print audit rows (newest first); ``backfill``: only those of that (namespace, name).
    ``dbt-backfill history`` and ``kubectl dbf history``; raises UsageError for a missing or
    unreachable database."""
    import sqlalchemy as sa

    engine = _audit_engine(url)
    try:
        audit.ensure_schema(engine)
        print_history(audit.history(engine, status=status, limit=limit, backfill=backfill))
    except sa.exc.DBAPIError as exc:  # a read-only role, a missing privilege
        raise UsageError(f"the database refused: {lifecycle.first_line(exc)}") from None
    return EXIT_OK


def _db_upgrade(args: argparse.Namespace) -> int:
    engine = _audit_engine(args.database_url)
    audit.upgrade(engine)
    print(f"audit schema at revision {audit.current_revision(engine)}")
    return EXIT_OK


def _run_subcommand(args: argparse.Namespace) -> int:
    """A subcommand's errors as one line: bad input and database refusals exit 2, the rest 1."""
    import sqlalchemy as sa

    prog = f"dbt-backfill {args.command}" + (f" {args.db_command}" if args.command == "db" else "")
    try:
        code: int = args.func(args)
    except (UsageError, PlanError, DatabaseUrlError) as exc:
        return _fail(prog, str(exc))
    except sa.exc.DBAPIError as exc:  # a read-only role, a missing privilege
        return _fail(prog, f"the database refused: {lifecycle.first_line(exc)}")
    except Exception as exc:
        return _unexpected(prog, exc, verbose=getattr(args, "verbose", False))
    return code


def limit_argument(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _check(args: argparse.Namespace) -> int:
    prog = "dbt-backfill check"
    session: runner.DbtSession | None = None
    try:
        for selector in args.models:
            if not SELECTOR_RE.match(selector):
                raise UsageError(f"model selector {selector!r} has characters dbt selectors never use")
        url = resolve_database_url(args.database_url)
        connection_settings(url)
        check_database(url)
        session = runner.DbtSession(
            url, project_dir=args.project_dir, profiles_dir=args.profiles_dir, target=args.target, quiet=True
        )
        session.parse()
        models = session.select_models(args.models)
        report = _contract_report(session, url, models, None)
    except (UsageError, RunnerError, NotCompilable) as exc:
        return _fail(prog, str(exc))
    finally:
        if session is not None:
            session.close()
    for finding in report.findings:
        print(finding.line())
        print(f"  fix: {finding.fix}")
    for note in report.notes:
        print(f"note: {note}")
    broken = sorted({f.model for f in report.findings})
    if broken:
        print(
            f"check: {len(report.findings)} finding(s) in {len(broken)} of {report.checked} model(s):"
            f" {', '.join(broken)}"
        )
        return EXIT_FAILED
    print(f"check: {report.checked} model(s) follow the backfill contract")
    return EXIT_OK


def _profile(args: argparse.Namespace) -> int:
    """Write the profile a run generates from DATABASE_URL, for an image's build-time parse."""
    try:
        project = read_project(find_project_dir(args.project_dir, os.environ, Path.cwd()))
        out = Path(args.output_dir)
        if (out / "profiles.yml").exists():
            raise UsageError(f"{out / 'profiles.yml'} exists; not overwritten")
        write_generated_profile(out, project.profile, args.target)
    except ProjectError as exc:
        raise UsageError(str(exc)) from None
    print(f"profile {project.profile} (target {args.target}, from DBT_PG_*) written to {out / 'profiles.yml'}")
    return EXIT_OK


def _demo_data(args: argparse.Namespace) -> int:
    from dbtbackfill.demo.data import load_demo_data

    try:
        url = resolve_database_url(args.database_url)
        start = planner.parse_date(args.start_date, "start_date")
        check_database(url)
        counts = load_demo_data(
            url, tenants=args.tenants, start_date=start, days=args.days, rows_per_day=args.rows_per_day
        )
    except ValueError as exc:  # the demo's own argument checks
        raise UsageError(str(exc)) from None
    print(
        f"demo data ready: {counts.customers} customers, {counts.orders} orders "
        f"for {args.tenants} tenants from {start} for {args.days} days"
    )
    return EXIT_OK


def _operator(args: argparse.Namespace) -> int:
    from dbtbackfill.operator.main import run_operator

    return run_operator(args)


def _demo(args: argparse.Namespace) -> int:
    from dbtbackfill.demo.run import run_demo

    code: int = run_demo(run_backfill, args.database_url, days=args.days)
    return code


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", "-v", action="store_true", help="show the traceback of an unexpected error")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dbt-backfill", description="Chunked, audited dbt backfills on PostgreSQL.")
    # The installed distribution's version, so an image or a wheel reports what it really holds.
    parser.add_argument("--version", action="version", version=f"%(prog)s {metadata.version('dbtbackfill')}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="backfill a date range (same as python -m scripts.run_dbt_backfill)")
    add_backfill_arguments(run)

    hist = sub.add_parser("history", help="recent audit rows from backfill_executions")
    hist.add_argument("--status", choices=audit.SHOWN_STATUSES, help="abandoned: running, but its heartbeat stopped")
    hist.add_argument("--limit", type=limit_argument, default=20)
    hist.add_argument("--database-url")
    _add_verbose(hist)
    hist.set_defaults(func=_history)

    db = sub.add_parser("db", help="audit-log schema")
    db_sub = db.add_subparsers(dest="db_command", required=True, parser_class=_Parser)
    up = db_sub.add_parser("upgrade", help="apply the audit-log migrations")
    up.add_argument("--database-url")
    _add_verbose(up)
    up.set_defaults(func=_db_upgrade)

    chk = sub.add_parser("check", help="lint models for the backfill contract and silently wrong shapes")
    chk.add_argument(
        "--project-dir",
        help="the dbt project (default: $DBT_PROJECT_DIR, else the working directory if it is one, else ./analytics)",
    )
    chk.add_argument("--profiles-dir", help="directory of the profiles.yml to use (as for run)")
    chk.add_argument("--target", help="dbt target of the profile (default: $DBT_TARGET, else the profile's)")
    chk.add_argument("--models", nargs="+", default=[], metavar="SELECTOR", help="dbt selection (default: all)")
    chk.add_argument("--database-url", help="PostgreSQL URL; overrides $DATABASE_URL")
    chk.set_defaults(func=_check)

    prof = sub.add_parser(
        "profile",
        help="write the project's profile as a run generates it from DATABASE_URL (DBT_PG_*), for an image",
    )
    prof.add_argument(
        "--project-dir",
        help="the dbt project (default: $DBT_PROJECT_DIR, else the working directory if it is one, else ./analytics)",
    )
    prof.add_argument("--output-dir", required=True, help="where profiles.yml goes (an existing one is kept)")
    prof.add_argument("--target", default=GENERATED_TARGET, help=f"the output's name (default {GENERATED_TARGET})")
    _add_verbose(prof)
    prof.set_defaults(func=_profile)

    demo_data = sub.add_parser("demo-data", help="load deterministic multi-tenant demo data into raw.*")
    demo_data.add_argument("--database-url")
    demo_data.add_argument("--tenants", type=int, default=3)
    demo_data.add_argument("--start-date", required=True)
    demo_data.add_argument("--days", type=int, required=True)
    demo_data.add_argument("--rows-per-day", type=int, default=20)
    _add_verbose(demo_data)
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
    op.add_argument(
        "--allowed-images",
        default=None,
        help="images chunk Jobs may run besides the default image: comma-separated exact images or prefixes "
        "ending in '*' (overrides DBT_BACKFILL_ALLOWED_IMAGES)",
    )
    op.add_argument(
        "--allowed-service-accounts",
        default=None,
        help="ServiceAccounts chunk Jobs may run as besides the default one, comma-separated "
        "(overrides DBT_BACKFILL_ALLOWED_SERVICE_ACCOUNTS)",
    )
    op.add_argument(
        "--workers",
        default=None,
        help="reconcile passes run at once, on as many threads; the API and audit connection pools are "
        "sized to match (default 32; overrides DBT_BACKFILL_WORKERS)",
    )
    op.set_defaults(func=_operator)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:
        _exit(run_backfill(argv[1:], prog="dbt-backfill run"))
    args = build_parser().parse_args(argv)
    sys.exit(_run_subcommand(args))


if __name__ == "__main__":
    main()
