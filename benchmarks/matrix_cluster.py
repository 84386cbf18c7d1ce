"""One matrix DbtBackfill of 100 tenants x 365 days (36,500 cells) on a real kube-apiserver.

``python -m benchmarks.matrix_cluster [--tenants 100] [--days 365] [--parallelism 20] [--duration-seconds 600]``

Runs on `benchmarks.cluster_harness` (a real control plane, the operator as its own process with
the RBAC of ``deploy/``, a real PostgreSQL for the audit log; chunk work is the harness's stub that
writes the chunk's audit row and exits). The operator is started and, once its watch on
DbtBackfills is open (the API server's audit log shows it), one DbtBackfill with ``spec.tenantIds``
of ``--tenants`` tenants and ``--days`` daily windows is created. The full run does not fit in a
benchmark's time, so it runs for ``--duration-seconds`` and the measures are over the cells reached;
the full run's duration is *extrapolated* from the steady admission rate. Measured:

- **RSS**: the operator's VmHWM (peak) and VmRSS sampled every 0.5 s, from /proc.
- **API writes per chunk**: the operator's ServiceAccount's writes on the namespace in the audit log,
  from creation to the end of the run, per chunk Job created and per cell completed.
- **Status size**: a watch on the DbtBackfill sees every version of ``.status``; its compact JSON
  size, peak and last (target <= 64 KiB, the issue's bound).
- **Time to plan**: from this process's create call to the operator's first ``patch
  dbtbackfills/status`` and first ``create jobs`` (audit log, same clock); and the pure pass work
  (parse, cells, decide, summarise) timed in this process, empty and at the last state seen.
- **Admission rate**: ``create jobs`` answered 201, per second, after the first ``parallelism``
  (the start-up burst) up to the last one; and per minute of the run.
- A Job watch (`tests.support.job_census`): the most chunk Jobs alive at once (<= parallelism).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import kubernetes.client

from benchmarks import recording
from benchmarks.cluster_harness import GROUP, JSON, PLURAL, SECRET, VERSION, Bench, bench, operator, wait_for
from benchmarks.cluster_traffic import audit_time, count_by_key, request_key, watch_lines
from dbtbackfill.core.spec import parse_spec
from dbtbackfill.operator import reconcile
from dbtbackfill.operator.status import summarise
from localcluster.audit import WRITE_VERBS
from tests.support.job_census import JobCensus

NAME = "matrix_cluster"
STATUS_LIMIT_BYTES = 64 * 1024
FIRST_DAY = date(2023, 1, 1)


def status_bytes(status: JSON) -> int:
    return len(json.dumps(status, separators=(",", ":")))


class StatusWatch:
    """Every version of the backfills' ``.status`` in the namespace, as a watch delivers them."""

    def __init__(self, b: Bench, namespace: str) -> None:
        self.cluster, self.namespace = b.cluster, namespace
        self.peak_bytes, self.versions = 0, 0
        self.last: JSON = {}
        self.stopped = False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.cluster.api_client() as client:
            listing = kubernetes.client.CustomObjectsApi(client).list_namespaced_custom_object
            for item in watch_lines(listing, GROUP, VERSION, self.namespace, PLURAL, stop=lambda: self.stopped):
                status = item.get("status") or {}
                self.versions += 1
                self.peak_bytes = max(self.peak_bytes, status_bytes(status))
                self.last = status


def pure_pass_seconds(spec_body: JSON, status: JSON) -> float:
    """One pass's pure work (no API, no audit): parse, plan the cells, decide, summarise."""
    clock = recording.Stopwatch()
    spec = parse_spec(spec_body)
    cells = spec.cells()
    state = reconcile.state_from_status(status)
    now = datetime.now(UTC)
    decision = reconcile.decide(spec, cells, state, [], now)
    summarise(windows=cells, state=decision.state, phase=decision.phase, running=decision.running,
              parallelism=spec.parallelism, generation=1, previous=status, now=now, matrix=True)  # fmt: skip
    return clock.seconds(4)


def admission(creates: list[float], started: float, parallelism: int) -> JSON:
    """Jobs created per second after the start-up burst, and per minute of the run."""
    steady = creates[parallelism:]
    span = steady[-1] - steady[0] if len(steady) > 1 else 0.0
    minutes = [0] * (int((creates[-1] - started) // 60) + 1 if creates else 0)
    for t in creates:
        minutes[int((t - started) // 60)] += 1
    return {
        "jobs_created": len(creates),
        "steady_per_second": round((len(steady) - 1) / span, 3) if span else None,
        "steady_from_seconds": round(steady[0] - started, 1) if steady else None,
        "jobs_per_minute": minutes,
    }


def run(b: Bench, tenants: int, days: int, parallelism: int, duration: float, ttl: int | None) -> JSON:
    ns = b.namespace("bench-matrix")
    census, watch = JobCensus(b.api(), ns), StatusWatch(b, ns)
    watch.thread.start()
    op = operator(b, ns, b.work_dir)
    op.start()
    wait_for(lambda: [e for e in b.operator_requests(ns) if request_key(e) == "watch dbtbackfills"],
             timeout=180, interval=1, what=f"the operator's DbtBackfill watch; log:\n{op.logs()[-3000:]}")  # fmt: skip
    ids = [f"tenant-{i:03d}" for i in range(tenants)]
    last_day = (FIRST_DAY + timedelta(days=days - 1)).isoformat()
    spec = {"startDate": FIRST_DAY.isoformat(), "endDate": last_day, "tenantIds": ids, "parallelism": parallelism,
            "databaseSecretRef": {"name": SECRET}}  # fmt: skip
    if ttl is not None:
        spec["ttlSecondsAfterFinished"] = ttl
    rss = recording.Sampler(lambda: (op.memory_kib().get("VmRSS") or 0) / 1024 or None)
    load = recording.Sampler(recording.load_average, interval=5)
    try:
        with rss, load:
            created = time.time()
            clock = recording.Stopwatch()
            extra = {k: v for k, v in spec.items() if k not in ("startDate", "endDate", "databaseSecretRef")}
            b.create_backfill(ns, "matrix", FIRST_DAY.isoformat(), last_day, **extra)
            while clock.seconds() < duration:
                time.sleep(min(15.0, max(0.1, duration - clock.seconds())))
                chunks = watch.last.get("chunks") or {}
                print(f"  {clock.seconds():7.1f} s: {chunks.get('succeeded', 0)}/{chunks.get('total', '?')} cells, "
                      f"{len(census.created)} Jobs, status {watch.peak_bytes:,} B peak, "
                      f"RSS {rss.values[-1] if rss.values else '?'} MiB, load {recording.load_average()}",
                      file=sys.stderr)  # fmt: skip
                if watch.last.get("phase") in ("Succeeded", "Failed"):
                    break
            seconds = clock.seconds()
            memory, cpu = op.memory_kib(), op.cpu_seconds()
            crashed = op.process is not None and op.process.poll() is not None
    finally:
        op.stop()
        census_error = None
        try:
            census.stop()
        except AssertionError as exc:  # a gap in the Job watch: its peak is a lower bound, the rest still holds
            census_error = str(exc)
    time.sleep(2)  # the last status event reaches the watch
    watch.stopped = True
    requests = [e for e in b.operator_requests(ns) if audit_time(e) >= created]
    writes = [e for e in requests if e["verb"] in WRITE_VERBS]
    creates = sorted(audit_time(e) for e in writes
                     if request_key(e) == "create jobs" and e["responseStatus"]["code"] == 201)  # fmt: skip
    patches = sorted(audit_time(e) for e in writes if request_key(e) == "patch dbtbackfills/status")
    rows = [r for r in b.audit_rows(ns) if r["kind"] == "chunk" and r["status"] == "completed"]
    last = watch.last
    done = int((last.get("chunks") or {}).get("succeeded") or 0)
    rate = admission(creates, created, parallelism)
    total = tenants * days
    per_second = rate["steady_per_second"]
    return {
        "tenants": tenants,
        "days": days,
        "cells": total,
        "parallelism": parallelism,
        "ttl_seconds_after_finished": ttl,
        "duration_seconds": seconds,
        "operator_exited_early": crashed,
        "phase_at_end": last.get("phase"),
        "cells_succeeded_status": done,
        "cells_completed_audit": len(rows),
        "rss_mib": {
            "peak_vmhwm": round(memory.get("VmHWM", 0) / 1024, 1),
            "end": round(memory.get("VmRSS", 0) / 1024, 1),
            "sampled": rss.summary(),
        },
        "operator_cpu_seconds": cpu,
        "writes": len(writes),
        "writes_per_job_created": round(len(writes) / len(creates), 2) if creates else None,
        "writes_per_cell_completed": round(len(writes) / done, 2) if done else None,
        "writes_by_verb_resource": count_by_key(writes),
        "requests_by_verb_resource": count_by_key(requests),
        "status_bytes": {
            "peak": watch.peak_bytes,
            "last": status_bytes(last),
            "versions_seen": watch.versions,
            "limit": STATUS_LIMIT_BYTES,
            "within_limit": watch.peak_bytes <= STATUS_LIMIT_BYTES,
        },
        "seconds_to_first_status_patch": round(patches[0] - created, 2) if patches else None,
        "seconds_to_first_job": round(creates[0] - created, 2) if creates else None,
        "pure_pass_seconds": {"empty": pure_pass_seconds(spec, {}), "last_state": pure_pass_seconds(spec, last)},
        "admission": rate,
        "peak_alive_jobs": census.peak,
        "job_watch_error": census_error,
        # Extrapolated, not measured: the time to the first Job plus every cell at the steady rate.
        "extrapolated_full_run_seconds": round((creates[0] - created) + total / per_second) if per_second else None,
        "load_average": load.summary(),
    }


def markdown(result: JSON) -> str:
    r, env = result["run"], result["environment"]
    s, a, rss, pure = r["status_bytes"], r["admission"], r["rss_mib"], r["pure_pass_seconds"]
    full = r["extrapolated_full_run_seconds"]
    measures = [
        ("Cells completed in the run (status / audit rows)",
         f"{r['cells_succeeded_status']:,} / {r['cells_completed_audit']:,} of {r['cells']:,}"),
        ("Operator RSS: peak (VmHWM) / at end", f"{rss['peak_vmhwm']} / {rss['end']} MiB"),
        ("Operator CPU over the run", f"{r['operator_cpu_seconds']} s"),
        ("API writes per chunk Job created / per cell completed",
         f"{r['writes_per_job_created']} / {r['writes_per_cell_completed']}"),
        (f"`.status` size: peak / last ({s['versions_seen']} versions seen by a watch; limit {s['limit']:,})",
         f"{s['peak']:,} / {s['last']:,} bytes (within: {s['within_limit']})"),
        ("Time to plan: create -> first status patch / first Job created",
         f"{r['seconds_to_first_status_patch']} / {r['seconds_to_first_job']} s"),
        ("One pass's pure work (parse, cells, decide, summarise): empty / last state",
         f"{pure['empty']} / {pure['last_state']} s"),
        (f"Chunks admitted per second (steady, after the first {r['parallelism']} Jobs)", a["steady_per_second"]),
        ("Most chunk Jobs alive at once (Job watch)", f"{r['peak_alive_jobs']} (parallelism {r['parallelism']})"),
        (f"**Extrapolated** full run (first Job + {r['cells']:,} cells at the steady rate)",
         f"{full} s ({full / 3600:.1f} h)" if full else "n/a"),
    ]  # fmt: skip
    finished = r["phase_at_end"] in ("Succeeded", "Failed")
    ended = "to the end" if finished else "stopped before the end: the measures are over the cells reached"
    table = "\n".join(f"| {k} | {v} |" for k, v in measures)
    rows = "\n".join(f"| `{k}` | {v} |" for k, v in r["writes_by_verb_resource"].items())
    return f"""# Matrix backfill on a real kube-apiserver (`python -m benchmarks.matrix_cluster`)

{env["date"]}, commit {env["git_commit"]}, {env["cpu_count"]} CPUs; load average {env["load_average_start"]} at
start, {r["load_average"]["mean"]} mean / {r["load_average"]["max"]} max during the run,
{env["load_average_end"]} at end.

One DbtBackfill of {r["tenants"]} tenants x {r["days"]} daily windows ({r["cells"]:,} cells), parallelism
{r["parallelism"]}, ttlSecondsAfterFinished {r.get("ttl_seconds_after_finished")}, stub chunks (no dbt). Run for
{r["duration_seconds"]} s, {ended}. Phase at the end: {r["phase_at_end"]}; operator exited early:
{r["operator_exited_early"]}.

| Measure | Result |
|---|---:|
{table}

Jobs created per minute of the run: {a["jobs_per_minute"]}.

The operator's writes in the namespace ({r["writes"]:,} in all):

| Request | Count |
|---|---:|
{rows}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=100)
    parser.add_argument("--days", type=int, default=365, help="daily windows from 2023-01-01")
    parser.add_argument("--parallelism", type=int, default=20)
    parser.add_argument("--duration-seconds", type=float, default=600, help="how long to run (it will not finish)")
    parser.add_argument("--ttl-seconds", type=int, default=None, help="spec.ttlSecondsAfterFinished (default: none)")
    parser.add_argument("--out", type=Path, default=recording.RESULTS_DIR)
    parser.add_argument("--keep", action="store_true", help="keep the cluster's and operator's logs")
    args = parser.parse_args(argv)
    if not (
        1 <= args.tenants <= 1000
        and args.days >= 1
        and 1 <= args.parallelism <= 32
        and args.duration_seconds > 0
        and (args.ttl_seconds is None or args.ttl_seconds >= 0)
    ):
        print("matrix_cluster: 1 <= --tenants <= 1000, --days >= 1, 1 <= --parallelism <= 32, "
              "--duration-seconds > 0, --ttl-seconds >= 0", file=sys.stderr)  # fmt: skip
        return 2
    env = recording.environment()
    with bench(args.keep, max_pods=args.parallelism + 10, chunk_seconds=0) as b:
        result: JSON = {"environment": env,
                        "run": run(b, args.tenants, args.days, args.parallelism, args.duration_seconds,
                                   args.ttl_seconds)}  # fmt: skip
    env["load_average_end"] = recording.load_average()
    recording.publish(NAME, result, markdown, args.out)
    r = result["run"]
    return 0 if r["status_bytes"]["within_limit"] and not r["operator_exited_early"] else 1


if __name__ == "__main__":
    sys.exit(main())
