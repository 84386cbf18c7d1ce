"""The operator on a real control plane, for benchmarks: what `operator_cluster` and `restart_soak` share.

Real parts: `localcluster` (etcd, kube-apiserver with RBAC and an audit log, the Job, TTL and GC
controllers, the scheduler) and its node agent running each Pod as a host process; the operator as
its own process (`dbt-backfill operator`) logged in as its ServiceAccount with the RBAC of
``deploy/``; a real PostgreSQL (`dbtbackfill.demo.localpg.LocalPostgres`) for the audit log.

One part is a stand-in, on purpose: the chunk's work. The chunk Jobs run the host "image"
``STUB_IMAGE``, whose entrypoint receives the operator's exact runner arguments and, instead of
running dbt (seconds of CPU a chunk), writes the chunk's completed audit row with ``psql`` and exits 0
(`CHUNK_STUB`). The operator then reads that row as it reads the runner's, so every chunk still
goes Job -> Pod -> audit row -> status. ``records_processed`` is ``chunk index + 1``, so sums can be
checked.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import kubernetes.client
import psycopg

from dbtbackfill.core import audit
from dbtbackfill.demo.localpg import LocalPostgres
from dbtbackfill.operator.policy import WAREHOUSE_LABEL, WAREHOUSE_LABEL_VALUE
from localcluster.cluster import LocalCluster
from localcluster.controlplane import REPO_ROOT
from tests.support.operator_process import OperatorProcess
from tests.support.polling import wait_established

GROUP, VERSION, PLURAL = "dbt-backfill.io", "v1alpha1", "dbtbackfills"
CRD_PATH = REPO_ROOT / "crds" / "dbtbackfills.dbt-backfill.io.yaml"
OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT = "dbt-backfill-system", "dbt-backfill-operator"
OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SERVICE_ACCOUNT}"
JOB_SERVICE_ACCOUNT = "dbt-backfill-job"
SECRET = "analytics-db"  # noqa: S105  # a Secret's name
STUB_IMAGE = "dbt-backfill-bench:chunk-stub"
JSON = dict[str, Any]

# $1.. are the runner's arguments (`python -m scripts.run_dbt_backfill --start-date ...`). The values
# are the operator's own (UUIDs, dates, integers, Kubernetes names), so quoting them in SQL is safe.
CHUNK_STUB = r"""
while [ $# -gt 0 ]; do
  case "$1" in
    --execution-id) id=$2; shift;; --parent-id) parent=$2; shift;; --chunk-index) chunk=$2; shift;;
    --attempt) attempt=$2; shift;; --start-date) start=$2; shift;; --end-date) end=$2; shift;;
    --backfill-name) name=$2; shift;; --backfill-namespace) ns=$2; shift;; --backfill-uid) uid=$2; shift;;
  esac
  shift
done
sleep "${CHUNK_SECONDS:-0}"
sql="insert into backfill_executions (id, parent_id, kind, start_date, end_date, status, duration_seconds,
  records_processed, backfill_name, backfill_namespace, backfill_uid, chunk_index, attempt, finished_at)
  values ('$id', '$parent', 'chunk', '$start', '$end', 'completed', ${CHUNK_SECONDS:-0}, $((chunk + 1)),
  '$name', '$ns', '$uid', $chunk, $attempt, now())
  on conflict (id) do update set status = 'completed', records_processed = excluded.records_processed,
  finished_at = now(), updated_at = now()"
n=0
until psql "${DBT_BACKFILL_AUDIT_URL:-$DATABASE_URL}" -qX -v ON_ERROR_STOP=1 -c "$sql"; do
  n=$((n + 1)); [ "$n" -ge 20 ] && exit 1; sleep 0.5
done
"""


def wait_for(check: Callable[[], Any], *, timeout: float, interval: float = 0.2, what: str = "it") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def read_json(call: Any, *args: Any, **kwargs: Any) -> JSON:
    return dict(json.loads(call(*args, _preload_content=False, **kwargs).data))


def operator(bench: Bench, namespace: str, log_dir: Path) -> OperatorProcess:
    """`dbt-backfill operator --namespace NS` as the bench's operator ServiceAccount, chunk Jobs on the stub."""
    return OperatorProcess(bench.operator_kubeconfig, bench.database_url, STUB_IMAGE, log_dir,
                           ["--namespace", namespace], log_name=f"operator-{namespace}")  # fmt: skip


class Bench:
    """PostgreSQL + the local cluster with the CRD, ``deploy/`` and the stub image; ``namespace()`` adds one."""

    def __init__(self, work_dir: Path, *, max_pods: int, chunk_seconds: float) -> None:
        self.work_dir = work_dir
        self.postgres = LocalPostgres(work_dir / "postgres")
        self.cluster = LocalCluster(
            work_dir / "cluster",
            die_with_parent=True,
            agent_options=(f"--max-pods={max_pods}", "--restart-backoff-seconds=1"),
        )
        self.chunk_seconds = chunk_seconds
        self.database_url = ""
        self.operator_kubeconfig = Path()
        self.client: kubernetes.client.ApiClient | None = None

    def up(self) -> None:
        self.database_url = self.postgres.start()
        audit.upgrade(audit.engine_for(self.database_url))  # what the first operator pass would do
        audit.dispose_engines()
        self.cluster.up()
        self.cluster.kubectl("apply", "--server-side", "-f", str(CRD_PATH))
        with self.cluster.api_client() as client:
            wait_established(client, f"dbtbackfills.{GROUP}")
        self.cluster.kubectl("apply", "-k", str(REPO_ROOT / "deploy"))
        self.operator_kubeconfig = self.cluster.service_account_kubeconfig(OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT)
        self.cluster.define_image(
            STUB_IMAGE,
            entrypoint=["sh", "-c", CHUNK_STUB, "chunk-stub"],
            env={"CHUNK_SECONDS": str(self.chunk_seconds)},
        )
        self.client = self.cluster.api_client()

    def down(self) -> None:
        if self.client is not None:
            self.client.close()  # type: ignore[no-untyped-call]
        self.cluster.down()
        self.postgres.stop()

    def api(self) -> kubernetes.client.ApiClient:
        assert self.client is not None
        return self.client

    def namespace(self, name: str) -> str:
        """A namespace with the database Secret and the chunk Jobs' ServiceAccount (deploy/examples)."""
        core: Any = kubernetes.client.CoreV1Api(self.api())  # plain dicts, not the typed models
        core.create_namespace({"metadata": {"name": name}})
        wait_for(lambda: _exists(core.read_namespaced_service_account, "default", name), timeout=30, what="default SA")
        core.create_namespaced_secret(
            name,
            {
                # The operator's policy hands only Secrets labelled for backfills to chunk Jobs.
                "metadata": {"name": SECRET, "labels": {WAREHOUSE_LABEL: WAREHOUSE_LABEL_VALUE}},
                "stringData": {"DATABASE_URL": self.database_url},
            },
        )
        core.create_namespaced_service_account(
            name, {"metadata": {"name": JOB_SERVICE_ACCOUNT}, "automountServiceAccountToken": False}
        )
        return name

    def create_backfill(self, namespace: str, name: str, start: str, end: str, **spec: Any) -> None:
        spec = {"startDate": start, "endDate": end, "databaseSecretRef": {"name": SECRET}, **spec}
        meta = {"name": name, "namespace": namespace}
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "DbtBackfill", "metadata": meta, "spec": spec}
        kubernetes.client.CustomObjectsApi(self.api()).create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, body
        )

    def backfills(self, namespace: str) -> list[JSON]:
        custom = kubernetes.client.CustomObjectsApi(self.api())
        return list(read_json(custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL)["items"])

    def jobs(self, namespace: str) -> list[JSON]:
        return list(read_json(kubernetes.client.BatchV1Api(self.api()).list_namespaced_job, namespace)["items"])

    def audit_rows(self, namespace: str) -> list[JSON]:
        with psycopg.connect(self.database_url) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
            cur.execute("select * from backfill_executions where backfill_namespace = %s", (namespace,))
            return list(cur.fetchall())

    def operator_requests(self, namespace: str | None = None) -> list[JSON]:
        """The operator's requests from the API server's audit log (``namespace``: on its objects only)."""
        events = []
        needle = f'"username":"{OPERATOR_USER}"'
        with self.cluster.audit_log.open(errors="replace") as log:
            for line in log:
                if needle not in line:
                    continue  # cheap pre-filter: the log holds every component's requests
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                # A watch is logged once it has started (its ResponseComplete comes when it ends,
                # maybe after this read); every other request once it is answered.
                stage = "ResponseStarted" if event.get("verb") == "watch" else "ResponseComplete"
                if event.get("stage") != stage or event["user"].get("username") != OPERATOR_USER:
                    continue
                if namespace is None or (event.get("objectRef") or {}).get("namespace") == namespace:
                    events.append(event)
        return events


def _exists(read: Callable[..., Any], *args: Any) -> bool:
    try:
        read(*args)
    except kubernetes.client.ApiException as e:
        if e.status == 404:
            return False
        raise
    return True


@contextmanager
def bench(keep: bool, *, max_pods: int, chunk_seconds: float) -> Iterator[Bench]:
    work_dir = Path(tempfile.mkdtemp(prefix="dbtbackfill-bench-"))
    env = Bench(work_dir, max_pods=max_pods, chunk_seconds=chunk_seconds)
    try:
        env.up()
        yield env
    finally:
        env.down()
        if keep:
            print(f"kept {work_dir}", file=sys.stderr)
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
