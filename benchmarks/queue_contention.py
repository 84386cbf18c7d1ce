"""Queue under contention: three backfills on one DbtBackfillQueue of 4, on a real kube-apiserver.

``python -m benchmarks.queue_contention [--chunks 12] [--max-running 4] [--chunk-seconds 1]``

Runs on `benchmarks.cluster_harness` (a real control plane, the operator as its own process with the
RBAC of ``deploy/``, a real PostgreSQL for the audit log; chunk work is the harness's stub that
writes the chunk's audit row and exits). Three backfills of ``--chunks`` daily chunks each, with
priorities 10, 5 and 0 and ``parallelism`` equal to the queue's ceiling (so each alone would fill
it), are created while the queue is paused; then it is unpaused. A watch on the namespace's Jobs
(`tests.support.job_census`) records, in the API server's order of events, the most chunk Jobs
alive at once and the order in which the Jobs were created. Reported: the peak (must not pass the
ceiling), whether priority order held (every Job of a higher priority created before any Job of a
lower one), the time from unpausing to all three Succeeded, and chunks admitted per second.
"""

from __future__ import annotations

import argparse
import sys
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import kubernetes.client

from benchmarks import recording
from benchmarks.cluster_harness import GROUP, JSON, SECRET, VERSION, Bench, bench, operator, wait_for
from tests.support.job_census import JobCensus
from tests.support.polling import wait_established

NAME = "queue_contention"
QUEUES = "dbtbackfillqueues"
PRIORITIES = {"urgent": 10, "normal": 5, "routine": 0}


def run(b: Bench, log_dir: Path, chunks: int, max_running: int, timeout: float) -> JSON:
    ns = b.namespace("bench-queue")
    # The operator's policy hands only Secrets labelled for backfills to chunk Jobs.
    kubernetes.client.CoreV1Api(b.api()).patch_namespaced_secret(
        SECRET, ns, {"metadata": {"labels": {"dbt-backfill.io/warehouse": "true"}}}
    )
    wait_established(b.api(), f"{QUEUES}.{GROUP}")
    custom = kubernetes.client.CustomObjectsApi(b.api())
    queue = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "DbtBackfillQueue", "metadata": {"name": "warehouse"},
             "spec": {"maxRunningChunks": max_running, "paused": True}}  # fmt: skip
    custom.create_namespaced_custom_object(GROUP, VERSION, ns, QUEUES, queue)
    census = JobCensus(b.api(), ns)
    op = operator(b, ns, log_dir)
    op.start()
    try:
        end = (date(2024, 1, 1) + timedelta(days=chunks - 1)).isoformat()
        for i, (name, priority) in enumerate(PRIORITIES.items()):
            # Distinct tenants: the overlap guard lets them run side by side; only the queue limits them.
            b.create_backfill(ns, name, "2024-01-01", end, tenantId=f"tenant-{i:03d}", parallelism=max_running,
                              queueName="warehouse", priority=priority)  # fmt: skip

        def phases() -> dict[str, Any]:
            return {x["metadata"]["name"]: (x.get("status") or {}).get("phase") for x in b.backfills(ns)}

        wait_for(lambda: set(phases().values()) == {"Queued"}, timeout=300,
                 what=f"all Queued on the paused queue; operator log:\n{op.logs()[-3000:]}")  # fmt: skip
        assert not census.created, "a paused queue admitted a chunk"
        clock = recording.Stopwatch()
        custom.patch_namespaced_custom_object(GROUP, VERSION, ns, QUEUES, "warehouse", {"spec": {"paused": False}},
                                              _content_type="application/merge-patch+json")  # fmt: skip
        wait_for(lambda: set(phases().values()) == {"Succeeded"}, timeout=timeout,
                 what=f"all Succeeded; operator log:\n{op.logs()[-3000:]}")  # fmt: skip
        seconds = clock.seconds()
    finally:
        census.stop()
        op.stop()
    created = census.created
    ranks = [-PRIORITIES[name] for name in created]
    return {
        "backfills": dict(PRIORITIES),
        "chunks_per_backfill": chunks,
        "max_running_chunks": max_running,
        "jobs_created": len(created),
        "peak_alive_jobs": census.peak,
        "ceiling_held": census.peak <= max_running,
        "priority_order_held": ranks == sorted(ranks),
        "creation_order": _runs(created),
        "seconds_unpause_to_all_succeeded": seconds,
        "chunks_admitted_per_second": round(len(created) / seconds, 2) if seconds else None,
    }


def _runs(names: list[str]) -> list[list[Any]]:
    """``[["urgent", 12], ["normal", 12], ...]``: the creation order, compressed."""
    out: list[list[Any]] = []
    for name in names:
        if out and out[-1][0] == name:
            out[-1][1] += 1
        else:
            out.append([name, 1])
    return out


def markdown(result: JSON) -> str:
    r, env = result["run"], result["environment"]
    order = ", then ".join(f"{n} {name}" for name, n in r["creation_order"])
    return f"""# Queue under contention (`python -m benchmarks.queue_contention`)

{env["date"]}, commit {env["git_commit"]}, {env["cpu_count"]} CPUs; load average {env["load_average_start"]} at
start, {env["load_average_end"]} at end.

Three backfills ({", ".join(f"{k} priority {v}" for k, v in r["backfills"].items())}) of
{r["chunks_per_backfill"]} daily chunks each, parallelism {r["max_running_chunks"]}, on one queue of
{r["max_running_chunks"]}, created while it was paused, then unpaused.

| Measure | Result |
|---|---:|
| Most chunk Jobs alive at once (Job watch) | {r["peak_alive_jobs"]} (ceiling {r["max_running_chunks"]}) |
| Priority order held | {r["priority_order_held"]} |
| Jobs created | {r["jobs_created"]} |
| Unpause to all Succeeded | {r["seconds_unpause_to_all_succeeded"]} s |
| Chunks admitted per second | {r["chunks_admitted_per_second"]} |

Jobs in creation order: {order}.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=12, help="daily chunks of each backfill")
    parser.add_argument("--max-running", type=int, default=4, help="the queue's maxRunningChunks")
    parser.add_argument("--chunk-seconds", type=float, default=1.0, help="how long each stub chunk sleeps")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", type=Path, default=recording.RESULTS_DIR)
    parser.add_argument("--keep", action="store_true", help="keep the cluster's and operator's logs")
    args = parser.parse_args(argv)
    if min(args.chunks, args.max_running) < 1 or args.max_running > 32 or args.chunk_seconds < 0:
        print("queue_contention: --chunks >= 1, 1 <= --max-running <= 32, --chunk-seconds >= 0", file=sys.stderr)
        return 2
    env = recording.environment()
    with bench(args.keep, max_pods=3 * args.max_running + 4, chunk_seconds=args.chunk_seconds) as b:
        result: dict[str, Any] = {"environment": env, "run": run(b, b.work_dir, args.chunks, args.max_running,
                                                                  args.timeout)}  # fmt: skip
    env["load_average_end"] = recording.load_average()
    recording.publish(NAME, result, markdown, args.out)
    return 0 if result["run"]["ceiling_held"] and result["run"]["priority_order_held"] else 1


if __name__ == "__main__":
    sys.exit(main())
