"""Restart soak: kill -9 the operator at random points of a backfill, many times; nothing may double or go missing.

``python -m benchmarks.restart_soak [--trials 20] [--chunks 30] [--kills 3] [--seed N]``

Not a test (it takes minutes and its kill points are random): a script to run by hand, on
`benchmarks.cluster_harness` (a real control plane, the operator as a process with the RBAC of
``deploy/``, a real PostgreSQL; each chunk's stub writes its audit row after ``--chunk-seconds``).

Each trial, in a namespace of its own: start the operator, create a DbtBackfill of ``--chunks``
daily chunks, then ``--kills`` times wait a random 0.5..``--max-gap`` seconds, SIGKILL the operator,
leave it dead for a random 0..2 s (Jobs finish meanwhile, unseen) and start it again. Once the
backfill is ``Succeeded`` the trial passes only if

- every chunk has exactly one audit row ``completed`` (``chunk_index`` 0..N-1, once each), and none failed;
- the API server's audit log shows exactly one successful ``create jobs`` (201) per chunk Job,
  every other create of it answered 409 (a replay after a restart), and each chunk has one Job;
- the backfill's audit row is ``completed`` with ``records_processed`` = the chunks' sum
  (= ``status.recordsProcessed`` = N(N+1)/2 from the stub), and the status says ``N/N``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import kubernetes.client

from benchmarks import recording
from benchmarks.cluster_harness import GROUP, JSON, PLURAL, VERSION, Bench, bench, operator, wait_for

NAME = "restart_soak"


def check(b: Bench, ns: str, chunks: int) -> list[str]:
    """Everything that is wrong with the finished trial (empty: it passed)."""
    problems = []
    [backfill] = b.backfills(ns)
    status = backfill.get("status") or {}
    if status.get("progress") != f"{chunks}/{chunks}":
        problems.append(f"status progress {status.get('progress')}")
    rows = b.audit_rows(ns)
    chunk_rows = [r for r in rows if r["kind"] == "chunk"]
    completed = Counter(r["chunk_index"] for r in chunk_rows if r["status"] == "completed")
    if completed != Counter(range(chunks)):
        extra = {c: n for c, n in completed.items() if n != 1}
        problems.append(f"completed chunk rows: {len(completed)} chunks, not once each: {extra}")
    failed = [r["chunk_index"] for r in chunk_rows if r["status"] != "completed"]
    if failed:
        problems.append(f"chunk rows not completed: {failed}")
    parents = [r for r in rows if r["kind"] == "backfill"]
    expected = chunks * (chunks + 1) // 2
    if len(parents) != 1 or parents[0]["status"] != "completed":
        problems.append(f"backfill rows: {[(r['status'], r['records_processed']) for r in parents]}")
    elif not parents[0]["records_processed"] == status.get("recordsProcessed") == expected:
        problems.append(
            f"records: row {parents[0]['records_processed']}, status {status.get('recordsProcessed')}, "
            f"chunks {expected}"
        )
    requests = b.operator_requests(ns)
    creates = [e for e in requests if e["verb"] == "create" and e["objectRef"]["resource"] == "jobs"]
    created = Counter(e["objectRef"].get("name") for e in creates if e["responseStatus"]["code"] == 201)
    odd = [f"{e['objectRef'].get('name')}: {e['responseStatus']['code']}" for e in creates
           if e["responseStatus"]["code"] not in (201, 409)]  # fmt: skip
    if any(n != 1 for n in created.values()) or odd:
        problems.append(f"Job creates: {[n for n, k in created.items() if k != 1]} twice; other answers {odd}")
    jobs_per_chunk = Counter((j["metadata"].get("labels") or {}).get(f"{GROUP}/chunk") for j in b.jobs(ns))
    if jobs_per_chunk != Counter(str(c) for c in range(chunks)) or len(created) != chunks:
        problems.append(f"Jobs per chunk {dict(jobs_per_chunk)}, {len(created)} created")
    return problems


def trial(b: Bench, number: int, args: argparse.Namespace, rng: random.Random) -> JSON:
    ns = b.namespace(f"soak-{number}")
    op = operator(b, ns, b.work_dir)
    clock = recording.Stopwatch()
    op.start()
    end = date(2024, 1, 1) + timedelta(days=args.chunks - 1)
    b.create_backfill(ns, "soak", "2024-01-01", end.isoformat(), parallelism=args.parallelism)

    def succeeded() -> bool:
        return any((x.get("status") or {}).get("phase") == "Succeeded" for x in b.backfills(ns))

    kills: list[float] = []
    try:
        for _ in range(args.kills):
            time.sleep(rng.uniform(0.5, args.max_gap))
            if succeeded():
                break
            kills.append(clock.seconds())
            op.kill()
            time.sleep(rng.uniform(0, 2))
            op.start()
        try:
            wait_for(succeeded, timeout=args.timeout, interval=0.5, what="Succeeded")
            problems = check(b, ns, args.chunks)
        except TimeoutError as e:
            problems = [f"{e}; operator log:\n{op.logs()[-1500:]}"]
        seconds = clock.seconds()
        replays = sum(
            1
            for e in b.operator_requests(ns)
            if e["verb"] == "create" and e["objectRef"]["resource"] == "jobs" and e["responseStatus"]["code"] == 409
        )
        custom = kubernetes.client.CustomObjectsApi(b.api())
        custom.delete_collection_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)
        wait_for(lambda: not b.backfills(ns), timeout=120, what="the CR deleted")
    finally:
        op.stop()
    kubernetes.client.CoreV1Api(b.api()).delete_namespace(ns)
    result = {"trial": number, "passed": not problems, "seconds": seconds, "kills_at_seconds": kills,
              "operator_starts": op.starts, "job_creates_answered_409": replays,
              "problems": problems}  # fmt: skip
    verdict = "passed" if not problems else "FAILED"
    print(f"trial {number}: {verdict} in {seconds} s, kills at {kills}, "
          f"{replays} replayed creates, load {recording.load_average()} {problems or ''}", file=sys.stderr)  # fmt: skip
    return result


def markdown(result: JSON) -> str:
    env, a = result["environment"], result["arguments"]
    failed = [t for t in result["trials"] if not t["passed"]]
    lines = "\n".join(f"- trial {t['trial']}: {'; '.join(t['problems'])}" for t in failed) or "none"
    return f"""# Restart soak (`python -m benchmarks.restart_soak`)

{env["date"]}, commit {env["git_commit"]}, {env["cpu_count"]} CPUs, load average {env["load_average_start"]} at
start, {result["load_average"]["mean"]} mean / {result["load_average"]["max"]} max, {env["load_average_end"]} at end.

**{result["passed"]}/{result["run"]} trials passed** in {result["wall_seconds"]} s wall time: each a backfill of
{a["chunks"]} daily chunks (parallelism {a["parallelism"]}, {a["chunk_seconds"]} s per chunk), the operator
killed with SIGKILL up to {a["kills"]} times at random points ({result["kills"]} kills in all, seed {a["seed"]}).
Job creates answered 409 (replayed after a restart, as designed): {result["job_creates_answered_409"]}.

Failed trials: {lines}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--chunks", type=int, default=30)
    parser.add_argument("--parallelism", type=int, default=3)
    parser.add_argument("--kills", type=int, default=3, help="SIGKILLs per trial (fewer if it finishes first)")
    parser.add_argument("--max-gap", type=float, default=8.0, help="longest wait before a kill, seconds")
    parser.add_argument("--chunk-seconds", type=float, default=1.0, help="how long each chunk's stub runs")
    parser.add_argument("--timeout", type=float, default=600, help="per trial, after the last kill")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--out", type=Path, default=recording.RESULTS_DIR)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    if min(args.trials, args.chunks, args.parallelism) < 1 or args.kills < 0 or args.max_gap < 0.5:
        print("restart_soak: --trials, --chunks, --parallelism >= 1, --kills >= 0, --max-gap >= 0.5", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)  # noqa: S311  # kill points, not secrets
    env = recording.environment()
    clock = recording.Stopwatch()
    trials: list[dict[str, Any]] = []
    with (
        bench(args.keep, max_pods=60, chunk_seconds=args.chunk_seconds) as b,
        recording.Sampler(recording.load_average, interval=5) as load,
    ):
        for number in range(args.trials):
            trials.append(trial(b, number, args, rng))
    env["load_average_end"] = recording.load_average()
    result = {
        "environment": env,
        "arguments": vars(args) | {"seed": seed, "out": str(args.out)},
        "run": len(trials),
        "passed": sum(t["passed"] for t in trials),
        "wall_seconds": clock.seconds(),
        "kills": sum(len(t["kills_at_seconds"]) for t in trials),
        "job_creates_answered_409": sum(t["job_creates_answered_409"] for t in trials),
        "load_average": load.summary(),
        "trials": trials,
    }
    recording.publish(NAME, result, markdown, args.out)
    return 0 if result["passed"] == result["run"] else 1


if __name__ == "__main__":
    sys.exit(main())
