"""Operator cost benchmark: Kubernetes API writes per chunk, and status size at 3,650 chunks.

``python -m benchmarks.operator_api [--chunks 60] [--parallelism 5]``

1. Runs the real operator process, as its ServiceAccount from deploy/, against the local real
   control plane (`localcluster`: kube-apiserver, the real Job controller, the node agent), with a
   chunk image whose ``python`` is ``/bin/true`` (this measures the operator's API traffic, not
   dbt), and counts the write requests (create/update/patch/delete) the operator made, per
   resource and verb, per chunk, from the API server's audit log.
2. Builds the status of a 3,650-chunk daily backfill with the real summariser in its
   largest realistic shape (parallelism 32 running, 10 recent failures with 1 KiB messages,
   failed chunks scattered) and reports its JSON size.

Targets: at most 3 writes per chunk, and the status under 64 KiB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from dbtbackfill.planner import plan_windows
from dbtbackfill.reconcile import ChunkState, Failure
from dbtbackfill.status import summarise

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results" / "operator_api.json"
NAMESPACE = "bench"
OPERATOR_NAMESPACE = "dbt-backfill-system"  # deploy/
OPERATOR_SERVICE_ACCOUNT = "dbt-backfill-operator"
OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SERVICE_ACCOUNT}"


def status_size() -> dict[str, Any]:
    windows = plan_windows(date(2015, 1, 1), date(2024, 12, 30), "day")
    now = datetime(2025, 1, 1, tzinfo=UTC)
    failed = frozenset(range(7, len(windows), 401))  # scattered: no two adjacent ranges merge
    running = frozenset(range(2000, 2032))
    succeeded = frozenset(i for i in range(len(windows)) if i not in failed and i not in running and i % 97)
    state = ChunkState(
        succeeded=succeeded,
        failed=failed,
        attempts={i: 3 for i in (*failed, *running)},
        retry_base={i: 1 for i in failed},
        retry_at={i: now + timedelta(seconds=900) for i in list(running)[:5]},
        records=123_456_789_012,
        duration_count=len(succeeded),
        duration_total=float(len(succeeded) * 42),
        recent_failures=tuple(Failure(i, windows[i].label(), 3, "E" * 1024, now) for i in sorted(failed)[:10]),
    )
    status = summarise(windows=windows, state=state, phase="Running", running=running, parallelism=32,
                       generation=3, previous=None, now=now)  # fmt: skip
    encoded = json.dumps(status, separators=(",", ":"))
    return {"chunks": len(windows), "status_bytes": len(encoded), "target_bytes": 64 * 1024,
            "succeeded_ranges": len(status["succeededRanges"])}  # fmt: skip


def api_writes(chunks: int, parallelism: int) -> dict[str, Any]:
    import kubernetes.client

    from localcluster.audit import WRITE_VERBS
    from localcluster.cluster import LocalCluster

    with tempfile.TemporaryDirectory(prefix="operator-api-") as tmp:
        cluster = LocalCluster(Path(tmp) / "cluster", die_with_parent=True)
        # The chunk image: `python` is /bin/true, so a Job's Pod exits 0 at once.
        shim = Path(tmp) / "bin"
        shim.mkdir()
        (shim / "python").symlink_to("/bin/true")
        operator: subprocess.Popen[bytes] | None = None
        try:
            cluster.up()
            cluster.kubectl("apply", "-k", str(REPO_ROOT / "deploy"))
            cluster.kubectl("wait", "--for=condition=Established", "crd/dbtbackfills.dbt-backfill.io")
            kubeconfig = cluster.service_account_kubeconfig(OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT)
            cluster.define_image("bench:true", env={"PATH": str(shim)})
            with cluster.api_client() as client:
                core = kubernetes.client.CoreV1Api(client)
                core.create_namespace({"metadata": {"name": NAMESPACE}})
                secret = {"metadata": {"name": "db"}, "stringData": {"DATABASE_URL": "postgresql://unused@127.0.0.1/x"}}
                core.create_namespaced_secret(NAMESPACE, secret)
                core.create_namespaced_service_account(
                    NAMESPACE, {"metadata": {"name": "dbt-backfill-job"}, "automountServiceAccountToken": False}
                )
                env = os.environ | {"KUBECONFIG": str(kubeconfig), "DATABASE_URL": "",
                                    "DBT_BACKFILL_DEFAULT_IMAGE": "bench:true"}  # fmt: skip
                log = (Path(tmp) / "operator.log").open("wb")
                operator = subprocess.Popen(
                    [sys.executable, "-m", "dbtbackfill.cli", "operator", "--namespace", NAMESPACE,
                     "--liveness-port", "0", "--metrics-port", "0"],
                    cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                )  # fmt: skip
                custom = kubernetes.client.CustomObjectsApi(client)
                end = date(2024, 1, 1) + timedelta(days=chunks - 1)
                started = time.monotonic()
                custom.create_namespaced_custom_object(
                    "dbt-backfill.io", "v1alpha1", NAMESPACE, "dbtbackfills",
                    {"apiVersion": "dbt-backfill.io/v1alpha1", "kind": "DbtBackfill",
                     "metadata": {"name": "bench", "namespace": NAMESPACE},
                     "spec": {"startDate": "2024-01-01", "endDate": end.isoformat(), "parallelism": parallelism,
                              "databaseSecretRef": {"name": "db"}}},
                )  # fmt: skip

                def phase() -> str | None:
                    obj = custom.get_namespaced_custom_object("dbt-backfill.io", "v1alpha1", NAMESPACE,
                                                              "dbtbackfills", "bench")  # fmt: skip
                    return (obj.get("status") or {}).get("phase")

                while phase() != "Succeeded":
                    if time.monotonic() - started > 600:
                        print((Path(tmp) / "operator.log").read_text()[-5000:], file=sys.stderr)
                        raise TimeoutError("the benchmark backfill did not succeed in 600 s")
                    time.sleep(0.2)
                seconds = time.monotonic() - started
                time.sleep(2)  # audit lines land after the responses; let the last ones in
                events = cluster.audit_events(username=OPERATOR_USER)
        finally:
            if operator is not None:
                operator.terminate()
                try:
                    operator.wait(30)
                except subprocess.TimeoutExpired:
                    operator.kill()
                    operator.wait()
            cluster.down()
    writes = Counter(_call(e) for e in events if e["verb"] in WRITE_VERBS)
    total = sum(writes.values())
    return {
        "chunks": chunks,
        "parallelism": parallelism,
        "seconds": round(seconds, 2),
        "writes_total": total,
        "writes_per_chunk": round(total / chunks, 2),
        "writes_by_resource_verb": dict(sorted(writes.items())),
        "target_writes_per_chunk": 3,
        "all_calls": sorted({_call(e) for e in events}),
        "forbidden": sorted({_call(e) for e in events if e["responseStatus"]["code"] == 403}),
    }


def _call(event: dict[str, Any]) -> str:
    ref = event.get("objectRef") or {}
    resource = ref.get("resource") or event["requestURI"].split("?")[0]  # a non-resource URL: /version
    if ref.get("subresource"):
        resource += "/" + ref["subresource"]
    return f"{resource} {event['verb']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=60)
    parser.add_argument("--parallelism", type=int, default=5)
    args = parser.parse_args()
    result = {"status": status_size(), "api": api_writes(args.chunks, args.parallelism),
              "measured_at": datetime.now(UTC).isoformat(timespec="seconds")}  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
