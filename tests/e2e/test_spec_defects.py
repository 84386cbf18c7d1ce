"""Spec, CRD and policy defects that only a real API server shows, on the local control plane.

Each test failed before its fix:

- the CRD was refused at creation (the API server runs CEL rules on ``default: {}`` as written);
- a tenant id ending in '-' became a label value, so every Job create got a 422;
- a spec whose chunks reach past 9999-12-31 crashed the planner inside the overlap guard's scan
  of *every* backfill in the namespace, so none of them could start;
- any image, ServiceAccount or Secret of the namespace could be handed to a chunk Job.

The operator runs as a process with the kubeconfig of its ServiceAccount from ``deploy/`` (so with
exactly the RBAC it ships with); chunk Pods run as host processes under the node agent, with the
real runner and dbt against a real PostgreSQL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest
import yaml

from dbtbackfill.demo.data import load_demo_data
from localcluster.cluster import LocalCluster
from tests.support.polling import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = REPO_ROOT / "crds" / "dbtbackfills.dbt-backfill.io.yaml"
GROUP, VERSION, PLURAL = "dbt-backfill.io", "v1alpha1", "dbtbackfills"
IMAGE = "dbt-backfill-operator:e2e"
SECRET = "warehouse"
ABSENT = "absent"
JSON = dict[str, Any]


# ----------------------------------------------------------------------------- helpers


def custom(client: kubernetes.client.ApiClient) -> Any:
    return kubernetes.client.CustomObjectsApi(client)


def core(client: kubernetes.client.ApiClient) -> Any:
    return kubernetes.client.CoreV1Api(client)


def batch(client: kubernetes.client.ApiClient) -> Any:
    return kubernetes.client.BatchV1Api(client)


def create_backfill(client: kubernetes.client.ApiClient, namespace: str, name: str, **spec: Any) -> JSON:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "DbtBackfill",
        "metadata": {"name": name},
        "spec": {"startDate": "2024-01-01", "endDate": "2024-01-01", "databaseSecretRef": {"name": SECRET}, **spec},
    }
    created: JSON = custom(client).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    return created


def backfill(client: kubernetes.client.ApiClient, namespace: str, name: str) -> JSON:
    obj: JSON = custom(client).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    return obj


def jobs_of(client: kubernetes.client.ApiClient, namespace: str, name: str) -> list[JSON]:
    response = batch(client).list_namespaced_job(
        namespace, label_selector=f"{GROUP}/backfill={name}", _preload_content=False
    )
    items: list[JSON] = json.loads(response.data)["items"]
    return items


def create_secret(client: kubernetes.client.ApiClient, namespace: str, name: str, url: str, *, labelled: bool) -> None:
    labels = {"dbt-backfill.io/warehouse": "true"} if labelled else {}
    core(client).create_namespaced_secret(
        namespace, {"metadata": {"name": name, "labels": labels}, "stringData": {"DATABASE_URL": url}}
    )


class Operator:
    """``dbt-backfill operator`` as a process, as the operator's ServiceAccount."""

    def __init__(self, kubeconfig: Path, namespace: str, log: Path, env: dict[str, str]) -> None:
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dbtbackfill.cli", "operator", "--namespace", namespace,
                 "--liveness-port", "0", "--metrics-port", "0"],
                cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                env=os.environ | {"KUBECONFIG": str(kubeconfig), "DBT_BACKFILL_DEFAULT_IMAGE": IMAGE,
                                  "DBT_BACKFILL_WATCH_TIMEOUT_SECONDS": "30", **env},
            )  # fmt: skip

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture
def job_namespace(namespace: str, kube_client: kubernetes.client.ApiClient) -> str:
    """The test namespace with the chunk Jobs' ServiceAccount, as deploy/examples sets it up."""
    sa = yaml.safe_load((REPO_ROOT / "deploy" / "examples" / "job-serviceaccount.yaml").read_text())
    sa["metadata"]["namespace"] = namespace
    core(kube_client).create_namespaced_service_account(namespace, sa)
    return namespace


@pytest.fixture
def start_operator(
    operator_kubeconfig: Path, job_namespace: str, tmp_path: Path
) -> Iterator[Any]:  # a factory: some tests need the audit database, some a policy
    started: list[Operator] = []

    def start(**env: str) -> Operator:
        operator = Operator(operator_kubeconfig, job_namespace, tmp_path / f"operator-{len(started)}.log", env)
        started.append(operator)
        return operator

    yield start
    for operator in started:
        operator.stop()


@pytest.fixture
def chunk_image(cluster: LocalCluster) -> str:
    """The chunk Jobs' image on the node agent: the repository's runner and dbt project.

    The project stays where it is: a path under /tmp (pytest's tmp_path) would be rewritten into
    the Pod's /tmp volume, as the node agent does for every path under a mountPath. dbt's target
    and log directories are in that volume (the Job sets them), so nothing is written here.
    """
    project = REPO_ROOT / "analytics"
    cluster.define_image(
        IMAGE, env={"DBT_PROJECT_DIR": str(project), "DBT_PROFILES_DIR": str(project)}, working_dir=REPO_ROOT
    )
    return IMAGE


def wait_phase(client: kubernetes.client.ApiClient, namespace: str, name: str, phase: str, operator: Operator,
               timeout: float = 180) -> JSON:  # fmt: skip
    def reached() -> JSON | None:
        obj = backfill(client, namespace, name)
        return obj if (obj.get("status") or {}).get("phase") == phase else None

    result: JSON = wait_for(
        reached,
        timeout=timeout,
        interval=0.3,
        message=lambda: f"{name} status={backfill(client, namespace, name).get('status')}\n{operator.logs()}",
    )
    return result


def condition(obj: JSON, kind: str = "Succeeded") -> JSON:
    return next(c for c in obj["status"]["conditions"] if c["type"] == kind)


# ----------------------------------------------------------------------------- 1. the CRD


def renamed_crd(group: str) -> JSON:
    """The shipped CRD under another group, so the API server runs its creation checks afresh."""
    crd: JSON = yaml.safe_load(CRD_PATH.read_text())
    crd["metadata"]["name"] = f"{crd['spec']['names']['plural']}.{group}"
    crd["spec"]["group"] = group
    return crd


def create_crd(cluster: LocalCluster, crd: JSON) -> subprocess.CompletedProcess[str]:
    result: subprocess.CompletedProcess[str] = cluster.kubectl(
        "create", "--dry-run=server", "-f", "-", check=False, input=json.dumps(crd)
    )
    return result


def test_the_api_server_accepts_the_crd(cluster: LocalCluster) -> None:
    created = create_crd(cluster, renamed_crd("defaults-check.dbt-backfill.io"))
    assert created.returncode == 0, created.stderr
    # And the check is real: the old `retry: {default: {}}` is refused, as validation.go says.
    old = renamed_crd("defaults-check-old.dbt-backfill.io")
    old["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["retry"]["default"] = {}
    refused = create_crd(cluster, old)
    assert refused.returncode != 0
    assert "no such key" in refused.stderr, refused.stderr


def test_a_backfill_without_retry_or_chunk_gets_the_defaults(kube_client: kubernetes.client.ApiClient,
                                                               namespace: str) -> None:  # fmt: skip
    created = create_backfill(kube_client, namespace, "defaults")
    assert created["spec"]["retry"] == {"limit": 2, "backoffSeconds": 30, "maxBackoffSeconds": 900}
    assert created["spec"]["chunk"] == {"unit": "day", "size": 1}
    # An explicit {} is defaulted field by field to the same.
    explicit = create_backfill(kube_client, namespace, "explicit", retry={}, chunk={})
    assert explicit["spec"]["retry"] == created["spec"]["retry"]
    assert explicit["spec"]["chunk"] == created["spec"]["chunk"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"nodeSelector": {"zone-": "a"}}, "nodeSelector keys must be label keys"),
        ({"resources": {"limits": {"cpu": "1e2.5"}}}, "spec.resources.limits.cpu"),
        ({"resources": {"limits": {"gpu": 1}}}, "resource names must be cpu, memory"),
        ({"ttlSecondsAfterFinished": 2**31}, "spec.ttlSecondsAfterFinished"),
    ],
    ids=["node-selector-key", "fractional-exponent", "resource-name", "ttl-int32"],
)
def test_the_crd_refuses_what_a_job_could_not_hold(kube_client: kubernetes.client.ApiClient, namespace: str,
                                                    spec: JSON, message: str) -> None:  # fmt: skip
    with pytest.raises(kubernetes.client.ApiException) as info:
        create_backfill(kube_client, namespace, "refused", **spec)
    assert info.value.status == 422
    assert message in str(info.value.body)


# ----------------------------------------------------------------------------- 2-3. running


@pytest.fixture
def warehouse(kube_client: kubernetes.client.ApiClient, job_namespace: str, database_url: str) -> str:
    load_demo_data(database_url, tenants=1, start_date=date(2024, 1, 1), days=2, rows_per_day=2)
    create_secret(kube_client, job_namespace, SECRET, database_url, labelled=True)
    return database_url


def test_a_tenant_ending_in_a_dash_runs(kube_client: kubernetes.client.ApiClient, job_namespace: str,
                                        warehouse: str, chunk_image: str, start_operator: Any) -> None:  # fmt: skip
    operator = start_operator(DATABASE_URL=warehouse)
    create_backfill(kube_client, job_namespace, "dash", tenantId="tenant-001-", retry={"limit": 0})
    done = wait_phase(kube_client, job_namespace, "dash", "Succeeded", operator)
    assert done["status"]["progress"] == "1/1"
    (job,) = jobs_of(kube_client, job_namespace, "dash")
    label = job["metadata"]["labels"]["dbt-backfill.io/tenant"]
    assert label.startswith("tenant-001.") and label != "tenant-001-"
    assert job["metadata"]["annotations"]["dbt-backfill.io/tenant"] == "tenant-001-"
    assert "tenant-001-" in job["spec"]["template"]["spec"]["containers"][0]["args"]


def test_one_bad_spec_never_blocks_another(kube_client: kubernetes.client.ApiClient, job_namespace: str,
                                           warehouse: str, chunk_image: str, start_operator: Any) -> None:  # fmt: skip
    # Created first, so the guard scans them on the good backfill's every pass.
    create_backfill(
        kube_client, job_namespace, "year-9999", startDate="9999-01-01", endDate="9999-12-31",
        chunk={"unit": "month", "size": 366}, retry={"limit": 0}, suspend=True,
    )  # fmt: skip
    create_backfill(
        kube_client, job_namespace, "over-limit", resources={"requests": {"cpu": "2"}, "limits": {"cpu": "1"}}
    )
    operator = start_operator(DATABASE_URL=warehouse)
    create_backfill(kube_client, job_namespace, "good", retry={"limit": 0})
    assert wait_phase(kube_client, job_namespace, "good", "Succeeded", operator)["status"]["progress"] == "1/1"

    invalid = wait_phase(kube_client, job_namespace, "over-limit", "Failed", operator)
    assert condition(invalid)["reason"] == "InvalidSpec"
    assert condition(invalid)["message"].startswith("spec.resources.requests.cpu: must not be more than")
    assert jobs_of(kube_client, job_namespace, "over-limit") == []
    # The far-future one is planned (its chunk ends with the calendar), not a crash.
    late = wait_phase(kube_client, job_namespace, "year-9999", "Suspended", operator)
    assert late["status"]["progress"] == "0/1"


# ----------------------------------------------------------------------------- 4. policy


@pytest.mark.parametrize(
    ("spec", "labelled", "message"),
    [
        ({"image": "evil.example/miner:1"}, True, "spec.image: 'evil.example/miner:1' is not allowed"),
        ({"serviceAccountName": "default"}, True, "spec.serviceAccountName: 'default' is not allowed"),
        ({}, False, f"spec.databaseSecretRef.name: Secret '{SECRET}' is not labelled dbt-backfill.io/warehouse=true"),
        ({"databaseSecretRef": {"name": ABSENT}}, True, f"spec.databaseSecretRef.name: Secret {ABSENT!r} does not"),
    ],
    ids=["image", "service-account", "unlabelled-secret", "missing-secret"],
)
def test_the_policy_refuses_and_creates_no_job(kube_client: kubernetes.client.ApiClient, job_namespace: str,
                                               start_operator: Any, spec: JSON, labelled: bool,
                                               message: str) -> None:  # fmt: skip
    create_secret(kube_client, job_namespace, SECRET, "postgresql://nobody@127.0.0.1:1/none", labelled=labelled)
    operator = start_operator()
    create_backfill(kube_client, job_namespace, "refused", **spec)
    refused = wait_phase(kube_client, job_namespace, "refused", "Failed", operator, timeout=60)
    assert condition(refused)["reason"] == "InvalidSpec"
    assert condition(refused)["message"].startswith(message)
    assert jobs_of(kube_client, job_namespace, "refused") == []


def test_an_allowed_image_prefix_and_a_labelled_secret_pass(
    kube_client: kubernetes.client.ApiClient, job_namespace: str, start_operator: Any
) -> None:
    """The other side: a configured prefix admits the image, and the Job is created with it
    (dry run against an unreachable database: the Job itself may fail, the policy let it through)."""
    create_secret(kube_client, job_namespace, SECRET, "postgresql://nobody@127.0.0.1:1/none", labelled=True)
    operator = start_operator(DBT_BACKFILL_ALLOWED_IMAGES="registry.example/team/*")
    create_backfill(kube_client, job_namespace, "allowed", image="registry.example/team/dbt:2", retry={"limit": 0})
    (job,) = wait_for(
        lambda: jobs_of(kube_client, job_namespace, "allowed"), timeout=60, message=lambda: operator.logs()
    )
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/team/dbt:2"
