"""Where a one-day chunk's time goes in Kubernetes, from the Job's creation to its container's exit.

``python -m benchmarks.chunk_cost_k8s [--repeats 5] [--image localhost/dbt-backfill-operator:dev]``

Needs the built image (``make image``), podman and the Kubernetes binaries (``make cluster-bin``).
It starts, in a temporary directory, a real PostgreSQL on loopback with the demo data in database
``analytics`` (the one the image's build-time parse is for, so every chunk reuses that parse) and
`localcluster` with the podman runtime: a real kube-apiserver (with its ``Metadata`` audit log),
the Job controller and the scheduler, and the node agent (in place of the kubelet) running each
Pod's container in the image with podman. No operator runs: each chunk is the exact Job it would
create (`dbtbackfill.operator.jobs.build_job` of a one-day ``DbtBackfill`` spec), created by this process,
with one variable added to the container, ``DBT_BACKFILL_TIMINGS=1``, so the runner prints its own
phases (`dbtbackfill.runner.phase_timings`). One uncounted chunk first creates the fact tables, so every
measured chunk runs its window compiled, as all chunks of a backfill but the first do.

Where each boundary comes from (all on the machine's one clock):

* Job created, Pod created (by the Job controller), Pod scheduled (the scheduler's
  ``pods/binding``): the ``stageTimestamp`` of those ``create`` requests in the API server's audit
  log (microseconds). The objects' own ``creationTimestamp``, ``PodScheduled`` and the container's
  ``startedAt``/``finishedAt`` have whole seconds only: they are recorded (``api_seconds``) but not
  used for the split;
* the runner process's start: ``/proc/self/stat`` inside the container (10 ms), so "container
  start" is node agent + ``podman create``/``start`` + tini, up to Python's exec;
* the runner's phases: its ``DBT_BACKFILL_TIMINGS`` marks (``time.time()``);
* exit: the node agent's first ``pods/status`` write after the runner's last mark, i.e. the
  interpreter's exit, ``podman start --attach`` returning, the agent's 0.1 s poll, its ``podman
  inspect`` and ``podman rm`` of the container, and the status write reporting ``terminated``.

Writes ``benchmarks/results/chunk_cost_k8s.{json,md}`` (means, medians and shares of the mean total;
the load average is sampled through the run, the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import kubernetes.client
import psycopg

from benchmarks.cluster_harness import read_json, wait_for
from benchmarks.recording import (
    RESULTS_DIR,
    BenchmarkError,
    Sampler,
    environment,
    load_average,
    median,
    publish,
)
from dbtbackfill.core.spec import parse_spec
from dbtbackfill.demo.data import load_demo_data
from dbtbackfill.demo.localpg import LocalPostgres
from dbtbackfill.operator.jobs import JobDefaults, Owner, build_job
from dbtbackfill.runner.phase_timings import ENV as TIMINGS_ENV
from dbtbackfill.runner.phase_timings import KEY as TIMINGS_KEY
from localcluster.cluster import LocalCluster

NAMESPACE: Final = "chunk-cost"
SECRET: Final = "warehouse"  # noqa: S105  # a Secret's name
DATABASE: Final = "analytics"  # the image's build-time parse is for this database (Dockerfile)
NODE_USER: Final = "system:node:localcluster-node"
FIRST_DAY: Final = date(2024, 1, 5)
JSON = dict[str, Any]
# (phase, from, to, what it is); the boundaries are audit-log events or the runner's marks.
PHASES: Final = (
    ("job_controller", "job_created", "pod_created", "Job created -> Pod created (Job controller)"),
    ("scheduler", "pod_created", "pod_scheduled", "Pod created -> Pod bound (scheduler)"),
    ("container_start", "pod_scheduled", "process_start", "bound -> runner started (agent, podman create/start, tini)"),
    ("interpreter", "process_start", "main", "interpreter start-up and the runner's imports (SQLAlchemy, ...)"),
    ("connect", "main", "connected", "arguments, connection check"),
    ("dbt_import", "connected", "dbt_imported", "import dbt"),
    ("parse", "dbt_imported", "parsed", "dbt parse: loading the image's saved parse"),
    ("plan", "parsed", "planned", "dbt ls; the contract check's one dbt compile (window as parameters)"),
    ("audit_start", "planned", "audit_started", "audit schema check, the chunk's start row"),
    ("prepare", "audit_started", "engine", "compiled engine: the checks' compile reused; connect, PREPARE"),
    ("sql", "engine", "windows", "the window's SQL (one transaction)"),
    ("finish", "windows", "closed", "audit row finished, summary, session closed"),
    ("exit", "closed", "exited", "interpreter exit, podman start returns, agent's inspect + rm, status"),
)


def stamp(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def seed(server: LocalPostgres) -> str:
    url = server.url.rsplit("/", 1)[0] + f"/{DATABASE}"
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute(f'create database "{DATABASE}" template template0')
    load_demo_data(url, tenants=3, start_date=date(2024, 1, 1), days=60, rows_per_day=20)
    return url


def chunk_job(image: str, n: int) -> JSON:
    day = (FIRST_DAY + timedelta(days=n)).isoformat()
    spec = parse_spec({
        "startDate": day, "endDate": day, "chunk": {"unit": "day", "size": 1},
        "databaseSecretRef": {"name": SECRET}, "image": image,
    })  # fmt: skip
    [window] = spec.windows()
    job = build_job(Owner(f"cost-{n}", NAMESPACE, str(uuid.uuid4())), spec, window, 1, JobDefaults(image=image))
    job["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": TIMINGS_ENV, "value": "1"})
    return job


def run_chunk(cluster: LocalCluster, api: kubernetes.client.ApiClient, image: str, n: int) -> JSON:
    batch: Any = kubernetes.client.BatchV1Api(api)  # raw JSON in and out, not the typed models
    core: Any = kubernetes.client.CoreV1Api(api)
    job = chunk_job(image, n)
    name = job["metadata"]["name"]
    batch.create_namespaced_job(NAMESPACE, job)

    def finished() -> JSON | None:
        got = read_json(batch.read_namespaced_job, name, NAMESPACE)
        done = {c["type"] for c in (got.get("status") or {}).get("conditions") or [] if c["status"] == "True"}
        return got if done & {"Complete", "Failed"} else None

    got_job = wait_for(finished, timeout=600, what=f"Job {name}")
    [pod] = read_json(core.list_namespaced_pod, NAMESPACE, label_selector=f"job-name={name}")["items"]
    pod_name = pod["metadata"]["name"]
    log = "".join(p.read_text() for p in cluster.pod_logs(NAMESPACE, pod_name))
    if (got_job["status"].get("succeeded") or 0) != 1:
        raise BenchmarkError(f"chunk {name} failed:\n{log[-3000:]}")
    timed = [json.loads(line)[TIMINGS_KEY] for line in log.splitlines() if TIMINGS_KEY in line]
    if len(timed) != 1:
        raise BenchmarkError(f"{image} printed no {TIMINGS_ENV} line: rebuild it (`make image`)")
    marks = dict(timed[0]["marks_unix"])
    lines = log.splitlines()
    parse = next((line for line in lines if line.startswith("parse: ")), "")
    engine = [line for line in lines if line.startswith("engine: ")]

    def events() -> JSON | None:
        got: JSON = {}
        for event in cluster.audit_events(namespace=NAMESPACE, verbs=["create", "update", "patch"]):
            ref, at = event.get("objectRef") or {}, stamp(event["stageTimestamp"])
            kind, user = (ref.get("resource"), ref.get("subresource"), event["verb"]), event["user"]["username"]
            if kind == ("jobs", None, "create") and ref.get("name") == name:
                got["job_created"] = at
            elif kind == ("pods", None, "create") and "job_created" in got and "pod_created" not in got:
                got["pod_created"] = at  # the Job's Pod: one chunk at a time in the namespace
            elif kind == ("pods", "binding", "create") and ref.get("name") == pod_name:
                got["pod_scheduled"] = at
            elif kind[1] == "status" and ref.get("name") == pod_name and user == NODE_USER and at > marks["closed"]:
                got.setdefault("exited", at)
        return got if len(got) == 4 else None

    bounds = wait_for(events, timeout=10, what=f"the audit log's events of {name}") | marks
    phases = {p: round(bounds[b] - bounds[a], 4) for p, a, b, _ in PHASES if a in bounds and b in bounds}
    [status] = pod["status"]["containerStatuses"]
    scheduled = next(c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled")
    api_times = {
        "job_created": got_job["metadata"]["creationTimestamp"],
        "pod_created": pod["metadata"]["creationTimestamp"],
        "pod_scheduled": scheduled["lastTransitionTime"],
        "container_started": status["state"]["terminated"]["startedAt"],
        "container_finished": status["state"]["terminated"]["finishedAt"],
        "job_completed": got_job["status"].get("completionTime"),
    }
    t0 = stamp(api_times["job_created"])
    return {
        "job": name,
        "pod": pod_name,
        "parse_line": parse,
        "engine_lines": engine,
        "total_seconds": round(bounds["exited"] - bounds["job_created"], 4),
        "phases_seconds": phases,
        "cpu_seconds": {p: timed[0]["phases_cpu_seconds"].get(b) for p, _, b, _ in PHASES},
        "runner_timings": timed[0],
        "api_seconds": {k: None if v is None else round(stamp(v) - t0) for k, v in api_times.items()},
        "api_timestamps": api_times,
    }


def summarise(runs: list[JSON]) -> JSON:
    totals = [r["total_seconds"] for r in runs]
    mean_total = statistics.fmean(totals)
    out: JSON = {"total": {"mean": round(mean_total, 3), "median": median(totals)}}
    for phase, *_ in PHASES:
        values = [r["phases_seconds"][phase] for r in runs]
        mean = statistics.fmean(values)
        cpu = [r["cpu_seconds"][phase] for r in runs if r["cpu_seconds"][phase] is not None]
        out[phase] = {
            "cpu_mean": round(statistics.fmean(cpu), 3) if cpu else None,
            "mean": round(mean, 3),
            "median": median(values),
            "min": round(min(values), 3),
            "max": round(max(values), 3),
            "share_of_mean_total": round(mean / mean_total, 3),
        }
    return out


def markdown(report: JSON) -> str:
    env, s, load = report["environment"], report["summary"], report["load_average"]
    total = s["total"]["mean"]
    rows = [
        f"| {p} | {what} | {s[p]['median']:.3f} | {s[p]['mean']:.3f} | {s[p]['min']:.3f}-{s[p]['max']:.3f} "
        f"| {100 * s[p]['share_of_mean_total']:.1f} % | {'-' if s[p]['cpu_mean'] is None else s[p]['cpu_mean']} |"
        for p, _, _, what in PHASES
    ]
    cpu = sum(s[p]["cpu_mean"] or 0 for p, *_ in PHASES)
    kube = sum(s[p]["mean"] for p in ("job_controller", "scheduler", "container_start"))
    python = sum(s[p]["mean"] for p in ("interpreter", "connect", "dbt_import", "parse", "plan"))
    lines = [
        f"# Per-chunk cost in Kubernetes ({env['date']}, commit {env['git_commit']}, {env['cpu_count']} CPUs)",
        "",
        f"{report['repeats']} one-day chunks, each the operator's Job (`build_job`) in `{report['image']}` on a"
        " podman-runtime `localcluster`, against PostgreSQL on loopback; the image's parse reused, the window"
        f" compiled. Load average {load['min']}-{load['max']} (mean {load['mean']}) during the run.",
        "",
        "| Phase | What | Median s | Mean s | Range s | Share of mean total | Runner CPU s (mean) |",
        "|---|---|---:|---:|---:|---:|---:|",
        *rows,
        f"| **total** | Job created -> exit | {s['total']['median']:.3f} | {total:.3f} | | 100 % | {cpu:.3f} |",
        "",
        f"Kubernetes up to the runner's exec: {kube:.2f} s ({100 * kube / total:.0f} %); the runner's Python,"
        f" dbt and planning before any window: {python:.2f} s ({100 * python / total:.0f} %); the SQL itself:"
        f" {s['sql']['mean']:.3f} s ({100 * s['sql']['share_of_mean_total']:.1f} %).",
        "Boundaries: audit-log `stageTimestamp`s (us) for the API events, `/proc` (10 ms) for the process"
        " start, the runner's `DBT_BACKFILL_TIMINGS` marks; the API objects' own timestamps (whole seconds)"
        " are in the JSON. CPU: the runner process's user + system time per phase (tini and podman not counted).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chunk_cost_k8s", description=__doc__.split("\n")[0])
    parser.add_argument("--image", default=os.environ.get("IMAGE", "localhost/dbt-backfill-operator:dev"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory (default benchmarks/results)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (audit log, Pod logs)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if shutil.which("podman") is None or subprocess.run(["podman", "image", "exists", args.image]).returncode:
        print(f"chunk_cost_k8s: {args.image} is not in podman storage; run `make image`", file=sys.stderr)
        return 2

    env = environment()
    work = Path(tempfile.mkdtemp(prefix="chunk-cost-k8s-"))
    cluster = LocalCluster(work / "cluster", die_with_parent=True, runtime="podman")
    runs: list[JSON] = []
    try:
        with LocalPostgres(work / "pg") as server, Sampler(load_average, interval=1.0) as load:
            url = seed(server)
            cluster.up()
            with cluster.api_client() as api:
                core: Any = kubernetes.client.CoreV1Api(api)
                core.create_namespace({"metadata": {"name": NAMESPACE}})
                core.create_namespaced_service_account(NAMESPACE, {"metadata": {"name": "dbt-backfill-job"}})
                core.create_namespaced_secret(
                    NAMESPACE, {"metadata": {"name": SECRET}, "stringData": {"DATABASE_URL": url}}
                )
                warmup = run_chunk(cluster, api, args.image, 0)  # creates the fact tables; not counted
                for n in range(1, args.repeats + 1):
                    runs.append(run_chunk(cluster, api, args.image, n))
                    print(f"chunk {n}: {runs[-1]['total_seconds']} s {runs[-1]['phases_seconds']}", file=sys.stderr)
                    if not runs[-1]["parse_line"].startswith("parse: reused the saved parse"):
                        raise BenchmarkError(f"expected the image's parse reused, got {runs[-1]['parse_line']!r}")
                    if not runs[-1]["engine_lines"] or "compiled" not in runs[-1]["engine_lines"][-1]:
                        raise BenchmarkError(f"expected the compiled engine, got {runs[-1]['engine_lines']}")
    finally:
        cluster.down()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    env["load_average_end"] = load_average()
    report = {
        "environment": env,
        "image": args.image,
        "repeats": args.repeats,
        "load_average": load.summary(),
        "phases": [{"phase": p, "from": a, "to": b, "what": w} for p, a, b, w in PHASES],
        "summary": summarise(runs),
        "runs": runs,
        "warmup": warmup,
    }
    publish("chunk_cost_k8s", report, markdown, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
