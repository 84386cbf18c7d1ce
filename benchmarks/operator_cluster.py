"""The operator's cost on a real kube-apiserver: API writes per chunk, and 200 live backfills.

``python -m benchmarks.operator_cluster [--chunks 30] [--backfills 200] [--backfill-chunks 10]``

Everything runs on `benchmarks.cluster_harness` (a real control plane, the operator as its own
process with the RBAC of ``deploy/``, a real PostgreSQL for the audit log; chunk work is a stub
that writes the chunk's audit row and exits). Two parts, each with a fresh operator process:

1. **Writes per chunk.** One backfill of ``--chunks`` daily chunks (``--parallelism``). The API
   server's audit log lists every request of the operator's ServiceAccount; the writes (create,
   update, patch, delete) on the benchmark namespace from creating the CR to ``Succeeded``, by
   verb and resource, divided by the chunks. Deleting the finished CR is counted apart.
2. **Scale.** ``--backfills`` DbtBackfills of ``--backfill-chunks`` daily chunks each (disjoint
   date ranges, so none queues behind another), created at once. Measured: the operator's RSS
   (``/proc/<pid>/status`` VmRSS sampled every 0.5 s, VmHWM for the peak), and per chunk the
   latency from "Job finished" to "status says so": this script watches Jobs and DbtBackfills
   itself and stamps, on one clock, the first Job event with condition ``Complete`` and the first
   DbtBackfill event whose ``succeededRanges`` covers the chunk's day. Both watches are served by
   the same API server as the operator's, so their delivery delays roughly cancel.
   ``from_condition`` repeats it from the ``Complete`` condition's lastTransitionTime (whole
   seconds, so up to 1 s too long). Watch traffic: the operator's list/watch requests by resource,
   and whether each asked the server for a labelSelector.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import kubernetes.client

from benchmarks import recording
from benchmarks.cluster_harness import (
    GROUP,
    JSON,
    PLURAL,
    VERSION,
    Bench,
    bench,
    operator,
    wait_for,
)
from benchmarks.cluster_traffic import Stamps, audit_time, count_by_key, watch_traffic
from localcluster.audit import WRITE_VERBS

NAME = "operator_cluster"
TARGETS = {"writes_per_chunk": 3.0, "rss_mib": 300.0, "latency_p95_seconds": 2.0}


def phase_of(backfill: JSON) -> str | None:
    return (backfill.get("status") or {}).get("phase")


def writes(b: Bench, log_dir: Path, chunks: int, parallelism: int) -> JSON:
    ns = b.namespace("bench-writes")
    op = operator(b, ns, log_dir)
    op.start()
    try:
        clock = recording.Stopwatch()
        end = date(2024, 1, 1) + timedelta(days=chunks - 1)
        b.create_backfill(ns, "writes", "2024-01-01", end.isoformat(), parallelism=parallelism)
        wait_for(lambda: [x for x in b.backfills(ns) if phase_of(x) == "Succeeded"], timeout=900,
                 what=f"Succeeded; operator log:\n{op.logs()[-3000:]}")  # fmt: skip
        seconds = clock.seconds()
        time.sleep(3)  # the last Events and audit lines land
        deleted_at = time.time()
        kubernetes.client.CustomObjectsApi(b.api()).delete_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, "writes"
        )
        wait_for(lambda: not b.backfills(ns), timeout=120, what="the CR gone")
    finally:
        op.stop()
    time.sleep(2)
    requests = b.operator_requests(ns)
    run = [e for e in requests if audit_time(e) < deleted_at]
    deletion = [e for e in requests if audit_time(e) >= deleted_at and e["verb"] in WRITE_VERBS]
    run_writes = [e for e in run if e["verb"] in WRITE_VERBS]
    conflicts = [e for e in run_writes if e["responseStatus"]["code"] == 409]
    return {
        "chunks": chunks,
        "parallelism": parallelism,
        "seconds_to_succeeded": seconds,
        "writes": len(run_writes),
        "writes_per_chunk": round(len(run_writes) / chunks, 2),
        "writes_by_verb_resource": count_by_key(run_writes),
        "writes_answered_409": len(conflicts),
        "requests_by_verb_resource": count_by_key(run),
        "requests_per_chunk": round(len(run) / chunks, 2),
        "deletion_writes_by_verb_resource": count_by_key(deletion),
        "load_average_end": recording.load_average(),
    }


def scale(b: Bench, log_dir: Path, backfills: int, chunks: int, parallelism: int, timeout: float) -> JSON:
    ns = b.namespace("bench-scale")
    stamps = Stamps(b, ns)
    stamps.start()
    op = operator(b, ns, log_dir)
    began = time.time()
    op.start()
    rss = recording.Sampler(lambda: (op.memory_kib().get("VmRSS") or 0) / 1024 or None)
    load = recording.Sampler(recording.load_average, interval=5)
    clock = recording.Stopwatch()
    total = backfills * chunks
    try:
        with rss, load:
            for i in range(backfills):
                first = date(2020, 1, 1) + timedelta(days=i * chunks)
                last = first + timedelta(days=chunks - 1)
                b.create_backfill(ns, f"bf-{i:03d}", first.isoformat(), last.isoformat(), parallelism=parallelism)
            created_seconds = clock.seconds()

            def finished() -> bool:
                done = sum(1 for x in b.backfills(ns) if phase_of(x) == "Succeeded")
                print(f"  {clock.seconds():7.1f} s: {done}/{backfills} succeeded, {len(stamps.job_done)}/{total} "
                      f"chunk Jobs complete, load {recording.load_average()}", file=sys.stderr)  # fmt: skip
                return done == backfills

            wait_for(finished, timeout=timeout, interval=10, what=f"all Succeeded\n{op.logs()[-3000:]}")
            seconds = clock.seconds()
            time.sleep(5)  # idle: what the operator holds once everything is done
        memory = op.memory_kib()
        cpu = op.cpu_seconds()
    finally:
        stamps.stopped = True
        op.stop()
    time.sleep(2)
    requests = [e for e in b.operator_requests() if audit_time(e) >= began]
    in_namespace = [e for e in requests if (e.get("objectRef") or {}).get("namespace") == ns]
    writes = [e for e in in_namespace if e["verb"] in WRITE_VERBS]
    return {
        "backfills": backfills,
        "chunks_per_backfill": chunks,
        "chunks": total,
        "parallelism": parallelism,
        "create_seconds": created_seconds,
        "seconds_to_all_succeeded": seconds,
        "rss_mib": {
            "peak_vmhwm": round(memory.get("VmHWM", 0) / 1024, 1),
            "end": round(memory.get("VmRSS", 0) / 1024, 1),
            "sampled": rss.summary(),
        },
        "operator_cpu_seconds": cpu,
        "latency_seconds": stamps.latencies(),
        "watch_and_list_requests": watch_traffic(requests),
        "writes_per_chunk": round(len(writes) / total, 2),
        "writes_by_verb_resource": count_by_key(writes),
        "requests_by_verb_resource": count_by_key(in_namespace),
        "load_average": load.summary(),
    }


def markdown(result: JSON) -> str:
    w, s, env, met = result["writes"], result["scale"], result["environment"], result["targets_met"]
    lat, cond = s["latency_seconds"]["watch_to_watch"], s["latency_seconds"]["from_condition"]
    size = f"{s['backfills']} backfills x {s['chunks_per_backfill']} chunks"
    measures = [
        (f"API writes per chunk ({w['chunks']} daily chunks, parallelism {w['parallelism']})",
         w["writes_per_chunk"], "<= 3", met["writes_per_chunk"]),
        (f"Operator RSS, {size}: peak / at end", f"{s['rss_mib']['peak_vmhwm']} / {s['rss_mib']['end']} MiB",
         "<= 300 MiB", met["rss_mib"]),
        (f"Job finished -> status updated, p50 / p95 ({lat['count']} chunks)", f"{lat['p50']} / {lat['p95']} s",
         "p95 <= 2 s", met["latency_p95_seconds"]),
        ("the same from the Complete condition's lastTransitionTime (whole seconds)",
         f"{cond['p50']} / {cond['p95']} s", "", ""),
    ]  # fmt: skip
    table = "\n".join(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in measures)
    rows = "\n".join(f"| `{k}` | {v} |" for k, v in w["writes_by_verb_resource"].items())
    streams = "\n".join(f"| `{k}` | {v} |" for k, v in s["watch_and_list_requests"].items())
    tenths = ", ".join(str(p) for p in s["latency_seconds"]["p95_by_tenth_of_run"])
    return f"""# Operator on a real kube-apiserver (`python -m benchmarks.operator_cluster`)

{env["date"]}, commit {env["git_commit"]}, {env["cpu_count"]} CPUs; load average {env["load_average_start"]} at
start, {s["load_average"]["mean"]} mean / {s["load_average"]["max"]} max during the scale run, {env["load_average_end"]}
at end.

| Measure | Result | Target | Met |
|---|---:|---:|---|
{table}

Writes of the {w["chunks"]}-chunk backfill from creation to `Succeeded` ({w["writes"]} in all,
{w["writes_answered_409"]} answered 409; {w["seconds_to_succeeded"]} s):

| Request | Count |
|---|---:|
{rows}

Deleting it afterwards: {w["deletion_writes_by_verb_resource"]}.

Scale run: {s["chunks"]} chunks in {s["seconds_to_all_succeeded"]} s, {s["writes_per_chunk"]} writes per chunk,
operator CPU {s["operator_cpu_seconds"]} s. Latency p95 by tenth of the run (by when the Job completed): {tenths} s.
The operator's list and watch requests during it:

| Request | Count |
|---|---:|
{streams}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=30, help="daily chunks of the writes-per-chunk backfill")
    parser.add_argument("--parallelism", type=int, default=5, help="parallelism of that backfill")
    parser.add_argument("--backfills", type=int, default=200)
    parser.add_argument("--backfill-chunks", type=int, default=10)
    parser.add_argument("--backfill-parallelism", type=int, default=1)
    parser.add_argument("--max-pods", type=int, default=250, help="the node's Pod capacity")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--out", type=Path, default=recording.RESULTS_DIR)
    parser.add_argument("--keep", action="store_true", help="keep the cluster's and operator's logs")
    args = parser.parse_args(argv)
    if min(args.chunks, args.parallelism, args.backfills, args.backfill_chunks, args.backfill_parallelism) < 1:
        print("operator_cluster: counts must be >= 1", file=sys.stderr)
        return 2
    env = recording.environment()
    with bench(args.keep, max_pods=args.max_pods, chunk_seconds=0) as b:
        log_dir = b.work_dir
        print("writes per chunk ...", file=sys.stderr)
        result: dict[str, Any] = {"environment": env, "writes": writes(b, log_dir, args.chunks, args.parallelism)}
        print(f"  {result['writes']['writes_per_chunk']} writes per chunk", file=sys.stderr)
        print(f"{args.backfills} backfills x {args.backfill_chunks} chunks ...", file=sys.stderr)
        result["scale"] = scale(
            b, log_dir, args.backfills, args.backfill_chunks, args.backfill_parallelism, args.timeout
        )
    env["load_average_end"] = recording.load_average()
    s = result["scale"]
    p95 = s["latency_seconds"]["watch_to_watch"]["p95"]
    result["targets"] = TARGETS
    result["targets_met"] = {
        "writes_per_chunk": result["writes"]["writes_per_chunk"] <= TARGETS["writes_per_chunk"],
        "rss_mib": s["rss_mib"]["peak_vmhwm"] <= TARGETS["rss_mib"],
        "latency_p95_seconds": p95 is not None and p95 <= TARGETS["latency_p95_seconds"],
    }
    recording.publish(NAME, result, markdown, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
