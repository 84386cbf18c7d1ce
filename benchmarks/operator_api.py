"""Operator cost benchmark: Kubernetes API writes per chunk, and status size at 3,650 chunks.

``python -m benchmarks.operator_api [--chunks 60] [--parallelism 5]``

1. Runs the real operator process against the test HTTP Kubernetes API (kmock + shim from
   tests/support) with a test kubelet whose Jobs exit at once (``/bin/true`` stands in for
   the runner: this measures the operator's API traffic, not dbt), and counts the write
   requests (POST/PUT/PATCH/DELETE) the operator made, per kind and verb, per chunk.
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
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from dbtbackfill.kube import USER_AGENT
from dbtbackfill.planner import plan_windows
from dbtbackfill.reconcile import ChunkState, Failure
from dbtbackfill.status import summarise

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results" / "operator_api.json"


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
    sys.path.insert(0, str(REPO_ROOT))
    import kubernetes.client

    from tests.support.kubeapi import KubeAPI, load_crds
    from tests.support.kubelet import Kubelet

    with tempfile.TemporaryDirectory() as tmp:
        api = KubeAPI(crds=list(load_crds(REPO_ROOT / "crds" / "dbtbackfills.dbt-backfill.io.yaml")),
                      workdir=Path(tmp)).start()  # fmt: skip
        kubelet = Kubelet(api.kubeconfig, namespace="default", cwd=REPO_ROOT, python="/bin/true", max_parallel=50)
        env = os.environ | {"KUBECONFIG": str(api.kubeconfig), "DATABASE_URL": ""}
        log = (Path(tmp) / "operator.log").open("wb")
        operator = subprocess.Popen(
            [sys.executable, "-m", "dbtbackfill.cli", "operator", "--namespace", "default",
             "--liveness-port", "0", "--metrics-port", "0"],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            kubelet.start()
            client = api.api_client()
            kubernetes.client.CoreV1Api(client).create_namespaced_secret(
                "default",
                {"metadata": {"name": "db"}, "stringData": {"DATABASE_URL": "postgresql://unused@127.0.0.1/x"}},
            )
            api.reset_counts()
            end = date(2024, 1, 1) + timedelta(days=chunks - 1)
            started = time.monotonic()
            kubernetes.client.CustomObjectsApi(client).create_namespaced_custom_object(
                "dbt-backfill.io", "v1alpha1", "default", "dbtbackfills",
                {"apiVersion": "dbt-backfill.io/v1alpha1", "kind": "DbtBackfill",
                 "metadata": {"name": "bench", "namespace": "default"},
                 "spec": {"startDate": "2024-01-01", "endDate": end.isoformat(), "parallelism": parallelism,
                          "databaseSecretRef": {"name": "db"}}},
            )  # fmt: skip

            def phase() -> Any:
                obj = api.get("dbt-backfill.io/v1alpha1/dbtbackfills", "bench") or {}
                return (obj.get("status") or {}).get("phase") == "Succeeded"

            try:
                api.wait_for(phase, timeout=300, interval=0.2)
            except TimeoutError:
                print((Path(tmp) / "operator.log").read_text()[-5000:], file=sys.stderr)
                raise
            seconds = time.monotonic() - started
            writes = api.writes(agents=["kopf/", USER_AGENT])
            kubernetes.client.CustomObjectsApi(client).delete_namespaced_custom_object(
                "dbt-backfill.io", "v1alpha1", "default", "dbtbackfills", "bench"
            )
            api.wait_for(lambda: api.get("dbt-backfill.io/v1alpha1/dbtbackfills", "bench") is None, timeout=60)
            calls = api.requests(agents=["kopf/", USER_AGENT])
        finally:
            operator.terminate()
            try:
                operator.wait(30)
            except subprocess.TimeoutExpired:
                operator.kill()
                operator.wait()
            kubelet.stop()
            api.stop()
    total = sum(writes.values())
    return {
        "chunks": chunks,
        "parallelism": parallelism,
        "seconds": round(seconds, 2),
        "writes_total": total,
        "writes_per_chunk": round(total / chunks, 2),
        "writes_by_kind_verb": {f"{k} {v}": n for (k, v), n in sorted(writes.items())},
        "target_writes_per_chunk": 3,
        "all_calls_incl_delete": sorted(f"{k} {v}" for k, v in calls),
    }


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
