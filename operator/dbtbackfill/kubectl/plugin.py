"""``kubectl dbf``: a kubectl plugin for DbtBackfills (the console script ``kubectl-dbf``).

kubectl runs ``kubectl-dbf`` from ``PATH`` with every argument after ``dbf`` and passes no
flags of its own, so ``--namespace/-n``, ``--context`` and ``--kubeconfig`` are parsed here and
resolved as kubectl does: ``--kubeconfig``, else ``$KUBECONFIG``, else ``~/.kube/config`` (inside
a Pod, its ServiceAccount); the namespace from ``-n``, else the context's, else ``default``.

- ``status NAME``: the calendar heat map (:mod:`dbtbackfill.kubectl.calendar_view`), progress, ETA and
  the last failures, all from the backfill's ``.status``.
- ``retry`` / ``suspend`` / ``resume NAME``: a merge patch of ``spec.retryFailed`` (a new token)
  or ``spec.suspend``, exactly the fields the operator acts on.
- ``logs NAME --date D [--tenant T]``: the logs of the latest attempt's Pod of the chunk of D.
- ``history NAME``: the backfill's audit rows (``dbt-backfill history``, filtered to it).

Errors are one line on stderr: exit 2 for what the user can fix (not found, forbidden, a date no
chunk covers, a Pod that is gone), 1 for anything unforeseen.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Final, NoReturn

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from dbtbackfill.core.planner import PlanError
from dbtbackfill.core.spec import BackfillSpec, SpecError, parse_spec
from dbtbackfill.kubectl import calendar_view
from dbtbackfill.kubectl.calendar_view import CellState, Chunk, Grid
from dbtbackfill.operator import jobs
from dbtbackfill.operator.kube import GROUP, MERGE_PATCH, PLURAL, VERSION, _api_message
from dbtbackfill.operator.reconcile import snapshot_ids
from dbtbackfill.runner import lifecycle

PROG: Final = "kubectl dbf"
EXIT_OK: Final = 0
EXIT_UNEXPECTED: Final = 1
EXIT_USAGE: Final = 2
SERVICE_ACCOUNT_NAMESPACE: Final = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# The Job controller labels each Pod with its Job's uid (batch/v1, Kubernetes >= 1.27).
POD_JOB_UID_LABEL: Final = "batch.kubernetes.io/controller-uid"
CONTAINER: Final = "dbt"
MAX_TENANT_COLUMNS: Final = 12
SHOWN_FAILURES: Final = 5

STYLE: Final[Mapping[CellState, str]] = {
    "succeeded": "green",
    "running": "bold blue",
    "retrying": "yellow",
    "pending": "grey50",
    "failed": "bold red",
    "cancelled": "magenta",
}
# A glyph per state as well as a colour: the map reads without colour (pipes, NO_COLOR) too.
GLYPH: Final[Mapping[CellState, str]] = {
    "succeeded": "■",
    "running": "▶",
    "retrying": "↻",
    "pending": "·",
    "failed": "✗",
    "cancelled": "-",
}


class PluginError(Exception):
    """Something the user can fix: one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


# ------------------------------------------------------------------ the cluster


@dataclass
class Cluster:
    """The API client and namespace kubectl would use with the same flags."""

    api: Any
    namespace: str

    def custom(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self.api)

    def batch(self) -> Any:
        from kubernetes import client

        return client.BatchV1Api(self.api)

    def core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.api)


def connect(kubeconfig: str | None, context: str | None, namespace: str | None) -> Cluster:
    from kubernetes import client, config

    path = kubeconfig or os.environ.get("KUBECONFIG") or str(Path("~/.kube/config").expanduser())
    in_cluster = not kubeconfig and not os.environ.get("KUBECONFIG") and not Path(path).exists()
    try:
        if in_cluster and os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config()  # type: ignore[no-untyped-call]
            api = client.ApiClient()
            default_ns = SERVICE_ACCOUNT_NAMESPACE.read_text().strip() if SERVICE_ACCOUNT_NAMESPACE.exists() else None
        else:
            contexts, active = config.list_kube_config_contexts(config_file=path)  # type: ignore[no-untyped-call]
            chosen = next((c for c in contexts if c["name"] == context), None) if context else active
            if context and chosen is None:
                raise PluginError(f'context "{context}" does not exist in {path}')
            api = config.new_client_from_config(config_file=path, context=context)  # type: ignore[no-untyped-call]
            default_ns = ((chosen or {}).get("context") or {}).get("namespace")
    except config.ConfigException as exc:
        raise PluginError(f"cannot load the kubeconfig: {lifecycle.first_line(exc)}") from None
    except OSError as exc:
        raise PluginError(f"cannot read the kubeconfig: {exc}") from None
    api.user_agent = f"kubectl-dbf/{_version()}"
    return Cluster(api, namespace or default_ns or "default")


def _version() -> str:
    from dbtbackfill import __version__

    return __version__


@contextmanager
def api_errors(what: str) -> Iterator[None]:
    """An API error as one line: 404 and 403 name the object, anything else the server's text."""
    from kubernetes.client import ApiException

    try:
        yield
    except ApiException as exc:
        if exc.status == 404:
            raise PluginError(f"{what}: not found") from None
        if exc.status == 403:
            raise PluginError(f"{what}: forbidden: {_api_message(exc)}") from None
        raise PluginError(f"{what}: {_api_message(exc)}") from None
    except OSError as exc:  # urllib3's connection errors are OSErrors
        raise PluginError(f"{what}: cannot reach the API server: {lifecycle.first_line(exc)}") from None


def get_backfill(cluster: Cluster, name: str) -> dict[str, Any]:
    with api_errors(f'dbtbackfill "{name}" in namespace "{cluster.namespace}"'):
        obj: dict[str, Any] = cluster.custom().get_namespaced_custom_object(
            GROUP, VERSION, cluster.namespace, PLURAL, name
        )
    return obj


def patch_spec(cluster: Cluster, name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    with api_errors(f'dbtbackfill "{name}" in namespace "{cluster.namespace}"'):
        obj: dict[str, Any] = cluster.custom().patch_namespaced_custom_object(
            GROUP, VERSION, cluster.namespace, PLURAL, name, {"spec": dict(spec)}, _content_type=MERGE_PATCH
        )
    return obj


# ------------------------------------------------------------------ the plan of a backfill


@dataclass(frozen=True)
class Plan:
    spec: BackfillSpec
    chunks: list[Chunk]
    tenants_known: bool  # False: a tenantIdsFrom list the operator has not snapshotted yet


def plan_of(body: Mapping[str, Any]) -> Plan:
    """The chunks of a backfill as the operator numbers them (its cells, for a matrix)."""
    name = (body.get("metadata") or {}).get("name")
    try:
        spec = parse_spec(body.get("spec") or {})
    except (SpecError, PlanError) as exc:
        raise PluginError(f"dbtbackfill {name} has an invalid spec: {exc}") from None
    tenants = spec.tenants() or snapshot_ids(body.get("status"))
    if tenants is None:
        return Plan(spec, [], tenants_known=False)
    return Plan(spec, calendar_view.chunks_of(spec.cells(tenants), spec.tenant_id), tenants_known=True)


# ------------------------------------------------------------------ status


@dataclass(frozen=True)
class StatusView:
    """Everything ``status`` shows, computed from the object (rendered by :func:`render_status`)."""

    name: str
    namespace: str
    phase: str
    progress: str
    grid: Grid
    counts: dict[CellState, int]
    estimate: calendar_view.Estimate
    failures: list[Mapping[str, Any]]
    message: str | None
    cost: str | None = None  # a dry run's estimate of the real run (status.costEstimate)


def status_view(body: Mapping[str, Any], now: datetime, max_columns: int = MAX_TENANT_COLUMNS) -> StatusView:
    plan = plan_of(body)
    status: Mapping[str, Any] = body.get("status") or {}
    states = calendar_view.chunk_states(status, len(plan.chunks))
    grid = calendar_view.calendar(plan.spec.start_date, plan.spec.end_date, plan.chunks, states, max_columns)
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    succeeded = conditions.get("Succeeded") or {}
    # Why it stopped (an invalid spec, dbt's error), or why no plan is known yet.
    said = calendar_view.failure_summary(str(succeeded.get("message"))) if succeeded.get("status") == "False" else None
    meta = body.get("metadata") or {}
    return StatusView(
        name=str(meta.get("name")),
        namespace=str(meta.get("namespace")),
        phase=str(status.get("phase") or "Pending"),
        progress=str(status.get("progress") or f"0/{len(plan.chunks)}"),
        grid=grid,
        counts=calendar_view.counts(states),
        estimate=calendar_view.estimate(status, len(plan.chunks), plan.spec.parallelism, now),
        failures=list(status.get("recentFailures") or [])[-SHOWN_FAILURES:],
        message=said if plan.tenants_known else "the tenant list (spec.tenantIdsFrom) has not been read yet",
        cost=cost_line(status.get("costEstimate")),
    )


def cost_line(estimate: Any) -> str | None:
    """spec.dryRun's estimate of the real run in one line: source rows, the largest cell, the ETA."""
    if not isinstance(estimate, Mapping):
        return None
    parts = []
    if estimate.get("reportedCells") is not None:
        parts.append(f"~{int(estimate.get('estimatedSourceRows') or 0):,} source row(s) over "
                     f"{estimate['reportedCells']}/{estimate.get('cells', '?')} cell(s) estimated")  # fmt: skip
    largest = estimate.get("largestCell")
    if isinstance(largest, Mapping):
        tenant = f"tenant {largest['tenant']} " if largest.get("tenant") else ""
        parts.append(f"largest {tenant}{largest.get('window')} ~{int(largest.get('estimatedSourceRows') or 0):,}")
    seconds = estimate.get("estimatedSeconds")
    if seconds is not None:
        parts.append(f"real run ~{_duration(float(seconds))} from {estimate.get('pastChunks', 0)} past chunk(s)")
    else:
        parts.append("real run: no ETA (no past chunk of these models)")
    return "dry run: " + "; ".join(parts)


def _cell(cell: calendar_view.GridCell | None) -> Text:
    if cell is None:
        return Text(" ")
    if cell.state is None:
        return Text(" ")
    return Text(GLYPH[cell.state], style=STYLE[cell.state])


def render_grid(grid: Grid) -> Table:
    first = "week of" if grid.layout == "weeks" else "day"
    # SIMPLE_HEAD: a rule under the header, and a blank line between the weeks of the day layout.
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1))
    table.add_column(first, no_wrap=True)
    for column in grid.columns:
        table.add_column(column, justify="center", no_wrap=True)
    week: date | None = None
    for row in grid.rows:
        if grid.layout == "tenants" and week is not None and row.week != week:
            table.add_section()
        week = row.week
        table.add_row(row.label, *(_cell(c) for c in row.cells))
    return table


def legend(counts: Mapping[CellState, int]) -> Text:
    text = Text()
    for state in calendar_view.STATES:
        text.append(GLYPH[state], style=STYLE[state])
        text.append(f" {state} {counts.get(state, 0)}   ")
    return text


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def eta_line(view: StatusView, now: datetime) -> str:
    est = view.estimate
    failed = view.counts.get("failed", 0)
    waiting = f"; {failed} failed chunk(s) wait for `kubectl dbf retry`" if failed else ""
    if est.remaining == 0:
        return f"ETA: nothing left to run{waiting}"
    if est.mean_seconds is None:
        return f"ETA: unknown until a chunk finishes ({est.remaining} chunk(s) to run)"
    based = f"mean chunk {est.mean_seconds:.1f}s over {est.observed} finished chunk(s)"
    if view.phase != "Running" or est.finish is None:
        return f"ETA: none while {view.phase} ({est.remaining} chunk(s) to run; {based}){waiting}"
    left = (est.finish - now).total_seconds()
    return f"ETA: {est.finish:%Y-%m-%d %H:%M:%S}Z, in {_duration(left)} ({est.remaining} chunk(s) to run; {based})"


def render_status(view: StatusView, console: Console, now: datetime) -> None:
    console.print(Text(f"{view.namespace}/{view.name}: {view.phase}, {view.progress} chunk(s) succeeded", style="bold"))
    if view.message:
        console.print(view.message)
    console.print(render_grid(view.grid))
    console.print(legend(view.counts))
    console.print(eta_line(view, now))
    if view.cost:
        console.print(view.cost)
    if view.failures:
        # Two lines per failure, not a table: the message gets the terminal's whole width.
        console.print(Text("last failures", style="bold"))
        for f in view.failures:
            tenant = f" tenant {f['tenant']}" if f.get("tenant") else ""
            where = f"{f.get('window') or ''}, attempt {f.get('attempts')}, {f.get('time')}"
            head = f"  chunk {f.get('chunk')}{tenant} {where}"
            console.print(Text(head, style="red"))
            console.print(Text("    " + calendar_view.failure_summary(str(f.get("message") or ""))))


def cmd_status(args: argparse.Namespace, cluster: Cluster) -> int:
    now = datetime.now(UTC)
    view = status_view(get_backfill(cluster, args.name), now, args.max_tenant_columns)
    console = Console(highlight=False, no_color=args.no_color or None)
    render_status(view, console, now)
    return EXIT_OK


# ------------------------------------------------------------------ retry / suspend / resume


def _ref(cluster: Cluster, name: str) -> str:
    return f"dbtbackfill.{GROUP}/{name} (namespace {cluster.namespace})"


def cmd_retry(args: argparse.Namespace, cluster: Cluster) -> int:
    body = get_backfill(cluster, args.name)
    status = body.get("status") or {}
    failed = int((status.get("chunks") or {}).get("failed") or 0)
    ranges = ", ".join(status.get("failedRanges") or []) or "none"
    if not failed:
        print(f"{_ref(cluster, args.name)}: no failed chunk to retry; nothing changed")
        return EXIT_OK
    before = (body.get("spec") or {}).get("retryFailed")
    # A new token is what the operator acts on; microseconds keep two retries in one second apart.
    token = f"kubectl-dbf-{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}"
    patch_spec(cluster, args.name, {"retryFailed": token})
    print(f"{_ref(cluster, args.name)} patched: spec.retryFailed {before!r} -> {token!r}")
    print(f"{failed} failed chunk(s) will run again ({ranges}); succeeded chunks are kept")
    return EXIT_OK


def _set_suspend(args: argparse.Namespace, cluster: Cluster, suspend: bool) -> int:
    body = get_backfill(cluster, args.name)
    before = bool((body.get("spec") or {}).get("suspend", False))
    phase = (body.get("status") or {}).get("phase") or "Pending"
    if before == suspend:
        state = "suspended" if suspend else "not suspended"
        print(f"{_ref(cluster, args.name)} is already {state} ({phase}); nothing changed")
        return EXIT_OK
    patch_spec(cluster, args.name, {"suspend": suspend})
    print(f"{_ref(cluster, args.name)} patched: spec.suspend {str(before).lower()} -> {str(suspend).lower()}")
    if suspend:
        running = int(((body.get("status") or {}).get("chunks") or {}).get("running") or 0)
        print(f"no new chunk starts; {running} running chunk Job(s) are deleted and run again on resume")
    else:
        print(f"chunks not yet succeeded run again (was {phase})")
    return EXIT_OK


def cmd_suspend(args: argparse.Namespace, cluster: Cluster) -> int:
    return _set_suspend(args, cluster, True)


def cmd_resume(args: argparse.Namespace, cluster: Cluster) -> int:
    return _set_suspend(args, cluster, False)


# ------------------------------------------------------------------ logs


def chunk_for(plan: Plan, day: date, tenant: str | None) -> Chunk:
    """The chunk covering ``day`` (of ``tenant``); PluginError when none does, or several."""
    if not plan.tenants_known:
        raise PluginError("the tenant list (spec.tenantIdsFrom) has not been read by the operator yet")
    covering = [c for c in plan.chunks if c.start <= day <= c.end]
    if not covering:
        raise PluginError(f"no chunk covers {day}: the backfill runs {plan.spec.start_date}..{plan.spec.end_date}")
    if tenant is not None:
        chosen = [c for c in covering if c.tenant == tenant]
        if not chosen:
            known = ", ".join(sorted({str(c.tenant) for c in covering}))
            raise PluginError(f"tenant {tenant!r} is not one of the backfill's tenants ({known})")
        return chosen[0]
    if len(covering) > 1:
        tenants = ", ".join(str(c.tenant) for c in covering[:10])
        more = f" and {len(covering) - 10} more" if len(covering) > 10 else ""
        raise PluginError(f"{day} has a chunk per tenant ({tenants}{more}): pass --tenant")
    return covering[0]


def latest(items: Sequence[Mapping[str, Any]], key: Any) -> Mapping[str, Any] | None:
    return max(items, key=key, default=None)


def cmd_logs(args: argparse.Namespace, cluster: Cluster) -> int:
    try:
        day = date.fromisoformat(args.date)
    except ValueError:
        raise PluginError(f"--date must be YYYY-MM-DD, got {args.date!r}") from None
    body = get_backfill(cluster, args.name)
    plan = plan_of(body)
    chunk = chunk_for(plan, day, args.tenant)
    uid = body["metadata"]["uid"]
    where = f"chunk {chunk.index} ({chunk.start}..{chunk.end}" + (f", tenant {chunk.tenant})" if chunk.tenant else ")")
    selector = f"{jobs.LABEL_BACKFILL_UID}={uid},{jobs.LABEL_CHUNK}={chunk.index}"
    with api_errors(f"Jobs of {args.name}"):
        found = cluster.batch().list_namespaced_job(cluster.namespace, label_selector=selector).items
    job = latest([j.to_dict() for j in found], key=lambda j: jobs.chunk_of(j["metadata"]["labels"] or {}) or (0, 0))
    if job is None:
        state = calendar_view.chunk_states(body.get("status"), len(plan.chunks))[chunk.index]
        why = (
            "it has not been launched yet"
            if state == "pending" and not calendar_view.launched(body.get("status"), chunk.index)
            else "its Jobs are gone (ttlSecondsAfterFinished, or deleted); `kubectl dbf history` has its audit rows"
        )
        raise PluginError(f"no Job of {where} is left: {why}")
    job_name = job["metadata"]["name"]
    with api_errors(f"Pods of Job {job_name}"):
        pods = (
            cluster.core()
            .list_namespaced_pod(cluster.namespace, label_selector=f"{POD_JOB_UID_LABEL}={job['metadata']['uid']}")
            .items
        )
    pod = latest([p.to_dict() for p in pods], key=lambda p: p["metadata"]["creation_timestamp"])
    if pod is None:
        raise PluginError(f"the Pod of Job {job_name} ({where}) is gone; `kubectl dbf history` has its audit rows")
    pod_name = pod["metadata"]["name"]
    attempt = (jobs.chunk_of(job["metadata"]["labels"] or {}) or (0, 0))[1]
    with api_errors(f"logs of Pod {pod_name}"):
        text = cluster.core().read_namespaced_pod_log(pod_name, cluster.namespace, container=CONTAINER)
    print(f"# {where}, attempt {attempt}: Job {job_name}, Pod {pod_name}", file=sys.stderr)
    sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
    return EXIT_OK


# ------------------------------------------------------------------ history


def cmd_history(args: argparse.Namespace, namespace: str) -> int:
    """Rows of the backfill's namespace and name: they outlive the object, and a backfill
    deleted and created again under the same name lists both runs (newest first)."""
    from dbtbackfill import cli
    from dbtbackfill.core.database_url import DatabaseUrlError

    try:
        return cli.show_history(
            args.database_url, status=args.status, limit=args.limit, backfill=(namespace, args.name)
        )
    except (cli.UsageError, DatabaseUrlError) as exc:
        raise PluginError(str(exc)) from None


# ------------------------------------------------------------------ entry point


def build_parser() -> argparse.ArgumentParser:
    from dbtbackfill import cli
    from dbtbackfill.core import audit

    common = _Parser(add_help=False)
    common.add_argument("--namespace", "-n", help="the backfill's namespace (default: the context's)")
    common.add_argument("--context", help="the kubeconfig context to use")
    common.add_argument("--kubeconfig", help="path to the kubeconfig file (default: $KUBECONFIG, ~/.kube/config)")

    parser = _Parser(prog=PROG, description="Inspect and steer DbtBackfills.", parents=[common])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    status = sub.add_parser("status", parents=[common], help="calendar heat map, progress, ETA and last failures")
    status.add_argument("name")
    status.add_argument("--no-color", action="store_true", help="glyphs only (also: NO_COLOR, or not a terminal)")
    status.add_argument(
        "--max-tenant-columns",
        type=int,
        default=MAX_TENANT_COLUMNS,
        help=f"a column per tenant up to this many tenants, else one aggregate calendar (default {MAX_TENANT_COLUMNS})",
    )
    status.set_defaults(func=cmd_status)

    for name, func, text in (
        ("retry", cmd_retry, "re-run the failed chunks (sets a new spec.retryFailed token)"),
        ("suspend", cmd_suspend, "stop starting chunks and delete running ones (spec.suspend: true)"),
        ("resume", cmd_resume, "run the chunks not yet succeeded again (spec.suspend: false)"),
    ):
        command = sub.add_parser(name, parents=[common], help=text)
        command.add_argument("name")
        command.set_defaults(func=func)

    logs = sub.add_parser("logs", parents=[common], help="logs of the latest Pod of the chunk of a day")
    logs.add_argument("name")
    logs.add_argument("--date", required=True, help="a day of the chunk (YYYY-MM-DD)")
    logs.add_argument("--tenant", help="the tenant of the cell (a backfill of several tenants)")
    logs.set_defaults(func=cmd_logs)

    hist = sub.add_parser("history", parents=[common], help="the backfill's audit rows (backfill_executions)")
    hist.add_argument("name")
    hist.add_argument("--status", choices=audit.SHOWN_STATUSES)
    hist.add_argument("--limit", type=cli.limit_argument, default=50)
    hist.add_argument("--database-url", help="the audit database (default: $DATABASE_URL)")
    return parser


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prog = f"{PROG} {args.command}"
    try:
        if args.command == "history":
            # The audit database answers; the cluster is asked nothing, -n or the context names the namespace.
            code: int = cmd_history(args, args.namespace or connect(args.kubeconfig, args.context, None).namespace)
        else:
            code = args.func(args, connect(args.kubeconfig, args.context, args.namespace))
    except PluginError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # a bug or an environment we did not foresee: still one line
        print(f"{prog}: error: {type(exc).__name__}: {lifecycle.first_line(exc)}", file=sys.stderr)
        return EXIT_UNEXPECTED
    return code


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
