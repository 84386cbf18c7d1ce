"""The operator deployed as users deploy it: ``kubectl apply -k deploy/overlays/local`` on a real control plane.

Real parts throughout: the local control plane (kube-apiserver, the real Deployment, ReplicaSet, Job
and garbage-collector controllers, the scheduler), the node agent in place of the kubelet running
every Pod as a podman container of the image `make image` builds (read-only, as 10001, on the host
network, the ServiceAccount token projected so kopf's in-cluster config works), and a real PostgreSQL
on loopback with the demo data. Nothing is run as a host process: the operator is the Deployment's
Pod, the chunks are its Jobs' Pods.

The Secrets are made with kubectl as the README has users make them: the audit database in the
operator's namespace and in the backfill namespace, the warehouse labelled for the policy.
One install serves the module (CI time); each test uses its own backfill.

When ``$IMAGE`` names another tag than the overlay's (helpers sharing one podman storage build their
own), the same overlay naming that image is applied from a temporary directory; in CI the overlay is
applied as it is.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterator
from datetime import date, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from dbtbackfill.demo.data import load_demo_data
from dbtbackfill.demo.localpg import LocalPostgres
from localcluster.cluster import LocalCluster
from tests.conftest import REPO_ROOT, create_database
from tests.e2e.test_operator import audit_rows
from tests.image.conftest import LOCAL_OVERLAY, overlay_image, with_image
from tests.support.polling import wait_for

pytestmark = [pytest.mark.image, pytest.mark.e2e, pytest.mark.integration]

OPERATOR_NAMESPACE = "dbt-backfill-system"
NAMESPACE = "analytics"  # deploy/examples' namespace: the samples apply as they are
WAREHOUSE_SECRET = "analytics-warehouse"
AUDIT_SECRET = "dbt-backfill-audit-db"
FIRST_DAYS = REPO_ROOT / "deploy" / "examples" / "backfill-first-days.yaml"
# The image's build-time parse is for this database (Dockerfile), so chunk Pods reuse it.
WAREHOUSE_DATABASE = "analytics"


def overlay_for(image: str, workdir: Path) -> Path:
    """deploy/overlays/local itself, or (for another tag) the same overlay naming that image, in ``workdir``."""
    local = LOCAL_OVERLAY / "kustomization.yaml"
    if overlay_image(yaml.safe_load(local.read_text())) == image:
        return LOCAL_OVERLAY
    kustomization = with_image(local, image)
    kustomization["resources"] = [os.path.relpath(LOCAL_OVERLAY / r, workdir) for r in kustomization["resources"]]
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return workdir


class Install:
    """What the module installed, and kubectl as the admin (the user) on that cluster."""

    def __init__(self, cluster: LocalCluster, image: str, warehouse_url: str, audit_url: str) -> None:
        self.cluster, self.image = cluster, image
        self.warehouse_url, self.audit_url = warehouse_url, audit_url

    def kubectl(self, *args: str, input: str | None = None) -> str:
        return self.cluster.kubectl(*args, input=input).stdout

    def get(self, kind: str, name: str, namespace: str = NAMESPACE) -> dict[str, Any]:
        obj: dict[str, Any] = json.loads(self.kubectl("-n", namespace, "get", kind, name, "-o", "json"))
        return obj

    def items(self, kind: str, selector: str, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = json.loads(
            self.kubectl("-n", namespace, "get", kind, "-l", selector, "-o", "json")
        )["items"]
        return items

    def operator_pod(self) -> dict[str, Any]:
        [pod] = [
            p
            for p in self.items("pods", "app.kubernetes.io/name=dbt-backfill-operator", OPERATOR_NAMESPACE)
            if not p["metadata"].get("deletionTimestamp")
        ]
        return pod

    def operator_logs(self) -> str:
        return self.kubectl("-n", OPERATOR_NAMESPACE, "logs", "deployment/dbt-backfill-operator", "--tail=-1")

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.get("dbf", name).get("status") or {})

    def wait_succeeded(self, name: str, timeout: float = 900) -> dict[str, Any]:
        """Until the backfill ends, then ``kubectl wait --for=condition=Succeeded`` as the README waits.

        Polled first: kubectl runs under a 120 s limit here, and a loaded machine takes longer."""
        with contextlib.suppress(TimeoutError):  # kubectl wait below says what it waited for
            wait_for(lambda: self.status(name).get("phase") in ("Succeeded", "Failed"), timeout=timeout, interval=0.5)
        waited = self.cluster.kubectl(
            "-n", NAMESPACE, "wait", "--for=condition=Succeeded", f"dbf/{name}", "--timeout=10s", check=False
        )
        if waited.returncode != 0 or "condition met" not in waited.stdout:
            pytest.fail(
                f"{name} never Succeeded: {waited.stderr.strip()}\nstatus={self.status(name)}\n"
                f"operator log (last lines):\n{self.operator_logs()[-4000:]}"
            )
        return self.status(name)


@pytest.fixture(scope="module")
def install(podman_cluster: LocalCluster, image: str, pg_server: LocalPostgres) -> Iterator[Install]:
    warehouse_url = create_database(pg_server, WAREHOUSE_DATABASE)
    load_demo_data(warehouse_url, tenants=2, start_date=date(2024, 1, 1), days=10, rows_per_day=4)
    audit_url = create_database(pg_server, "deploy_local_audit")
    local = Install(podman_cluster, image, warehouse_url, audit_url)
    workdir = Path(tempfile.mkdtemp(prefix="deploy-local-overlay-"))
    kubectl = local.kubectl
    kubectl("apply", "-k", str(overlay_for(image, workdir)))
    kubectl(
        "-n",
        OPERATOR_NAMESPACE,
        "create",
        "secret",
        "generic",
        AUDIT_SECRET,
        f"--from-literal=DATABASE_URL={audit_url}",
    )

    # Polled until the Pod is ready (kubectl runs under a 120 s limit here), then as the README says.
    def available() -> bool:
        status = local.get("deployment", "dbt-backfill-operator", OPERATOR_NAMESPACE).get("status") or {}
        return bool(status.get("availableReplicas") == 1)

    with contextlib.suppress(TimeoutError):
        wait_for(available, timeout=600, interval=0.5)
    rollout = podman_cluster.kubectl(
        "-n", OPERATOR_NAMESPACE, "rollout", "status", "deployment/dbt-backfill-operator", "--timeout=60s", check=False
    )
    pods = kubectl("-n", OPERATOR_NAMESPACE, "get", "pods", "-o", "yaml")
    assert rollout.returncode == 0, f"{rollout.stderr}\n{pods}"
    assert "successfully rolled out" in rollout.stdout
    kubectl("create", "namespace", NAMESPACE)
    kubectl("-n", NAMESPACE, "apply", "-f", str(REPO_ROOT / "deploy" / "examples" / "job-serviceaccount.yaml"))
    kubectl(
        "-n", NAMESPACE, "create", "secret", "generic", WAREHOUSE_SECRET, f"--from-literal=DATABASE_URL={warehouse_url}"
    )
    kubectl("-n", NAMESPACE, "label", "secret", WAREHOUSE_SECRET, "dbt-backfill.io/warehouse=true")
    kubectl("-n", NAMESPACE, "create", "secret", "generic", AUDIT_SECRET, f"--from-literal=DATABASE_URL={audit_url}")
    try:
        yield local
    finally:
        # Backfills go while the operator still runs (its finalizer), then the operator: the session's
        # cluster is left as other modules expect it, with the CRD and RBAC still installed.
        podman_cluster.kubectl("-n", NAMESPACE, "delete", "dbf", "--all", "--timeout=90s", check=False)
        podman_cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
        podman_cluster.kubectl("-n", OPERATOR_NAMESPACE, "delete", "deployment", "dbt-backfill-operator",
                               "--timeout=90s", check=False)  # fmt: skip
        # Its Pod holds the host's ports 8080 and 9102 (host network) until it is gone.
        operator_pods = "app.kubernetes.io/name=dbt-backfill-operator"
        podman_cluster.kubectl("-n", OPERATOR_NAMESPACE, "wait", "--for=delete", "pod", "-l", operator_pods,
                               "--timeout=90s", check=False)  # fmt: skip
        shutil.rmtree(workdir, ignore_errors=True)


def chunk_pods(install: Install, name: str) -> list[dict[str, Any]]:
    return install.items("pods", f"dbt-backfill.io/backfill={name}")


def test_the_operator_pod_runs_the_image_as_its_deployment_says(install: Install) -> None:
    pod = install.operator_pod()
    (status,) = pod["status"]["containerStatuses"]
    assert status["name"] == "operator" and status["ready"] is True and status["state"].get("running")
    assert status["image"] == install.image
    assert status["containerID"] and not status["containerID"].startswith("host://")  # a container, not a process
    deployment = install.get("deployment", "dbt-backfill-operator", OPERATOR_NAMESPACE)
    assert deployment["status"]["readyReplicas"] == deployment["status"]["updatedReplicas"] == 1
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["DBT_BACKFILL_DEFAULT_IMAGE"] == install.image


def test_a_sample_backfill_runs_its_chunks_in_the_image_and_succeeds(install: Install) -> None:
    (sample,) = [d for d in yaml.safe_load_all(FIRST_DAYS.read_text()) if d]
    name = sample["metadata"]["name"]
    install.kubectl("apply", "-f", str(FIRST_DAYS))
    status = install.wait_succeeded(name)

    days = ["2024-01-01", "2024-01-02", "2024-01-03"]
    assert status["progress"] == "3/3"
    assert status["chunks"] == {"total": 3, "succeeded": 3, "failed": 0, "running": 0, "pending": 0}
    rows = audit_rows(install.audit_url, name)
    chunks = [r for r in rows if r["kind"] == "chunk"]
    assert sorted((r["chunk_index"], r["status"]) for r in chunks) == [
        (0, "completed"),
        (1, "completed"),
        (2, "completed"),
    ]
    assert all(r["records_processed"] > 0 for r in chunks)
    assert [str(r["start_date"]) for r in sorted(chunks, key=lambda r: r["chunk_index"])] == days
    [parent] = [r for r in rows if r["kind"] == "backfill"]
    assert parent["status"] == "completed"
    assert parent["records_processed"] == sum(r["records_processed"] for r in chunks) == status["recordsProcessed"]
    assert all(r["parent_id"] == parent["id"] for r in chunks)
    with psycopg.connect(install.warehouse_url) as conn:
        built = conn.execute("select min(order_date), max(order_date) from analytics.fact_daily_revenue").fetchone()
    assert built == (date(2024, 1, 1), date(2024, 1, 3))

    pods = chunk_pods(install, name)
    assert len(pods) == 3
    for pod in pods:
        (container,) = pod["status"]["containerStatuses"]
        assert container["image"] == install.image  # the chunk ran in the operator's image
        assert container["state"]["terminated"]["exitCode"] == 0
        assert not container["containerID"].startswith("host://")

    # What `kubectl logs` shows of a chunk: the runner's own report, and the image's parse reused.
    pod = next(p for p in pods if p["metadata"]["labels"]["dbt-backfill.io/chunk"] == "1")
    log = install.kubectl("-n", NAMESPACE, "logs", pod["metadata"]["name"])
    assert "parse: reused the saved parse" in log, log[-3000:]
    assert "2024-01-02..2024-01-02" in log and "completed" in log, log[-3000:]
    assert "Traceback" not in log

    # And of the operator: its JSON log, which followed this backfill.
    lines = [json.loads(line) for line in install.operator_logs().splitlines() if line.startswith("{")]
    assert lines, "the operator logged no JSON lines"
    assert any(name in json.dumps(line) for line in lines)


def test_killing_the_operator_container_mid_run_finishes_every_chunk_exactly_once(install: Install) -> None:
    """kill -9 of the operator's container (``podman kill``), as a crash: restartPolicy Always brings it back."""
    name = "restart-safety"
    chunks = 4
    manifest = {
        "apiVersion": "dbt-backfill.io/v1alpha1",
        "kind": "DbtBackfill",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "startDate": "2024-01-04",
            "endDate": "2024-01-07",
            "chunk": {"unit": "day", "size": 1},
            "parallelism": 1,
            "databaseSecretRef": {"name": WAREHOUSE_SECRET},
        },
    }
    before = install.operator_pod()
    (container,) = before["status"]["containerStatuses"]
    install.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    wait_for(lambda: install.status(name).get("chunks", {}).get("succeeded", 0) >= 1, timeout=600, interval=0.2,
             message=lambda: f"{install.status(name)}")  # fmt: skip

    killed_at = datetime.now().astimezone()
    container_id = container["containerID"].split("://", 1)[1]
    killed = subprocess.run(["podman", "kill", "--signal", "KILL", container_id], capture_output=True, text=True,
                            timeout=60, check=False)  # fmt: skip
    assert killed.returncode == 0, killed.stderr
    succeeded_at_kill = install.status(name)["chunks"]["succeeded"]
    assert succeeded_at_kill < chunks, "the backfill finished before the kill: nothing was tested"

    def restarted() -> bool:
        pod = install.operator_pod()
        (status,) = pod["status"]["containerStatuses"]
        same_pod = pod["metadata"]["uid"] == before["metadata"]["uid"]
        return same_pod and status["restartCount"] > container["restartCount"] and status["ready"] is True

    wait_for(restarted, timeout=300, interval=0.2, message=lambda: json.dumps(install.operator_pod()["status"]))
    (last,) = install.operator_pod()["status"]["containerStatuses"]
    assert last["lastState"]["terminated"]["exitCode"] == 137  # SIGKILL, not a clean exit
    # The killed container's log is still there (what `kubectl logs --previous` is for): it had this backfill.
    previous = install.kubectl("-n", OPERATOR_NAMESPACE, "logs", before["metadata"]["name"], "--previous")
    assert name in previous, previous[-3000:]

    status = install.wait_succeeded(name)
    assert status["progress"] == f"{chunks}/{chunks}"
    jobs = install.items("jobs", f"dbt-backfill.io/backfill={name}")
    per_chunk = Counter(j["metadata"]["labels"]["dbt-backfill.io/chunk"] for j in jobs)
    assert per_chunk == Counter({str(i): 1 for i in range(chunks)})  # no duplicate Job, none lost
    rows = [r for r in audit_rows(install.audit_url, name) if r["kind"] == "chunk"]
    assert Counter(r["chunk_index"] for r in rows) == Counter(range(chunks))  # each chunk ran once
    assert all(r["status"] == "completed" for r in rows)
    assert any(r["created_at"] > killed_at for r in rows), "no chunk started after the kill"
