"""Fixtures for end-to-end tests on a real Kubernetes control plane (see `localcluster`).

- ``cluster`` (session): a started `localcluster.cluster.LocalCluster` (etcd, kube-apiserver,
  kube-controller-manager, kube-scheduler from the pinned build, and the node agent that runs Pods
  as host processes in the repo root with this venv's ``python`` first on ``PATH``), with the
  project's CRD installed. It offers ``.kubeconfig`` (admin), ``.server``, ``.audit_log``,
  ``.kubectl(*args, check=True, input=None)``, ``.api_client()``,
  ``.service_account_kubeconfig(ns, name)``, ``.audit_events(username=None, verbs=None)``,
  ``.define_image(name, env=...)`` and ``.pod_logs(ns, pod)``.
- ``kube_client`` (session): an admin ``kubernetes.client.ApiClient``.
- ``namespace``: a fresh namespace per test (its ``default`` ServiceAccount exists), deleted after.
- ``operator_kubeconfig`` (session): ``deploy/`` installed, and a kubeconfig of the operator's
  ServiceAccount.
- The operator tests' fixtures, for every module here (test_operator, test_matrix, test_queue,
  test_kubectl_plugin ...): ``analytics_db`` (demo data in the test's own database),
  ``project_dir`` (the test's copy of analytics/), ``image`` (a host image running that copy),
  ``operator_scope``, ``operator`` (`dbt-backfill operator` as its own process, logged in as its
  ServiceAccount; its teardown deletes the test's backfills and checks the API server's audit log
  for a refused request) and ``broken_day`` (a model that fails for 2024-01-02 only).

One cluster serves the whole session (it starts in a few seconds); tests isolate by namespace.
Its state lives in a temporary directory of its own (`tests.support.session_clusters`);
``LOCALCLUSTER_KEEP=1`` keeps it. ``podman_cluster`` (tests/conftest.py) is a second one whose
node runs Pods in their images with podman.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import kubernetes.client
import pytest

from dbtbackfill.demo.data import load_demo_data
from dbtbackfill.operator.kube import USER_AGENT
from localcluster.cluster import LocalCluster
from tests.support.operator_process import SHORT_WATCHES, OperatorProcess
from tests.support.polling import wait_for
from tests.support.session_clusters import REPO_ROOT, fresh_namespace, session_cluster


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    with session_cluster("host") as local:
        yield local


@pytest.fixture(scope="session")
def kube_client(cluster: LocalCluster) -> Iterator[kubernetes.client.ApiClient]:
    with cluster.api_client() as client:
        yield client


@pytest.fixture
def namespace(
    cluster: LocalCluster, kube_client: kubernetes.client.ApiClient, request: pytest.FixtureRequest
) -> Iterator[str]:
    """A namespace of its own, named after the test; deleted (without waiting) afterwards."""
    with fresh_namespace(kube_client, request) as name:
        yield name


OPERATOR_NAMESPACE = "dbt-backfill-system"
OPERATOR_SERVICE_ACCOUNT = "dbt-backfill-operator"
OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SERVICE_ACCOUNT}"
GROUP, VERSION, PLURAL = "dbt-backfill.io", "v1alpha1", "dbtbackfills"
SECRET = "analytics-db"
JOB_SERVICE_ACCOUNT = "dbt-backfill-job"


@pytest.fixture(scope="session")
def operator_kubeconfig(cluster: LocalCluster) -> Path:
    """``deploy/`` installed as documented (``kubectl apply -k deploy/``), and a kubeconfig for the
    operator's ServiceAccount in it: the operator then has exactly the RBAC it ships with.

    The Deployment is scaled to 0 at once: the real Deployment controller would otherwise give it
    a Pod. Tests run the operator as a process with this kubeconfig instead.
    """
    cluster.kubectl("apply", "-k", str(REPO_ROOT / "deploy"))
    cluster.kubectl("scale", "deployment", "--all", "--replicas=0", "-n", OPERATOR_NAMESPACE)
    return cluster.service_account_kubeconfig(OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT)


@pytest.fixture
def analytics_db(database_url: str) -> str:
    load_demo_data(database_url, tenants=2, start_date=date(2024, 1, 1), days=31, rows_per_day=4)
    return database_url


@pytest.fixture
def project_dir(tmp_path: Path) -> Path:
    """A private copy of the dbt project, so a test can break a model without touching others."""
    copy = tmp_path / "analytics"
    shutil.copytree(REPO_ROOT / "analytics", copy, ignore=shutil.ignore_patterns("target", "logs", "dbt_packages"))
    # packages.yml installs ../dbt-package; the first chunk's runner runs `dbt deps`.
    shutil.copytree(REPO_ROOT / "dbt-package", tmp_path / "dbt-package")
    return copy


@pytest.fixture
def image(cluster: LocalCluster, namespace: str, project_dir: Path) -> str:
    """The chunk Jobs' image: the host with the test's project (what the real image bakes in)."""
    name = f"dbt-backfill-operator:{namespace}"
    cluster.define_image(name, env={"DBT_PROJECT_DIR": str(project_dir), "DBT_PROFILES_DIR": str(project_dir)},
                         working_dir=REPO_ROOT)  # fmt: skip
    return name


@pytest.fixture
def operator_scope(namespace: str) -> list[str]:
    return ["--namespace", namespace]


@pytest.fixture
def operator(
    cluster: LocalCluster, kube_client: kubernetes.client.ApiClient, operator_kubeconfig: Path, namespace: str,
    analytics_db: str, image: str, operator_scope: list[str], tmp_path: Path,
) -> Iterator[OperatorProcess]:  # fmt: skip
    core = kubernetes.client.CoreV1Api(kube_client)
    core.create_namespaced_secret(
        namespace,
        {
            # The operator's policy hands only Secrets labelled for backfills to chunk Jobs.
            "metadata": {"name": SECRET, "labels": {"dbt-backfill.io/warehouse": "true"}},
            "stringData": {"DATABASE_URL": analytics_db},
        },
    )
    # deploy/examples/job-serviceaccount.yaml, in this namespace: no token, no permissions.
    core.create_namespaced_service_account(
        namespace, {"metadata": {"name": JOB_SERVICE_ACCOUNT}, "automountServiceAccountToken": False}
    )
    proc = OperatorProcess(operator_kubeconfig, analytics_db, image, tmp_path, operator_scope, env=SHORT_WATCHES)
    proc.start()
    try:
        yield proc
        # Delete what is left while the operator still runs, so its finalizer lets go and the
        # namespace can go too; an all-namespaces operator started later must find nothing stale.
        custom = kubernetes.client.CustomObjectsApi(kube_client)
        custom.delete_collection_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
        if proc.process is not None and proc.process.poll() is None:
            wait_for(lambda: not custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"],
                     timeout=600, message=lambda: proc.logs()[-3000:])  # fmt: skip
    finally:
        proc.stop()
    assert_no_request_was_forbidden(cluster)


def assert_no_request_was_forbidden(cluster: LocalCluster) -> None:
    """The API server's audit log: the operator never made a request its RBAC does not grant.

    Only the operator's own requests (kopf's and our client's user agents): other tests use the
    same ServiceAccount with kubectl to probe what it is denied."""
    events = [e for e in cluster.audit_events(username=OPERATOR_USER)
              if e.get("userAgent", "").startswith(("kopf/", USER_AGENT))]  # fmt: skip
    assert events, "the operator made no API calls at all"
    forbidden = [f"{e['verb']} {e['requestURI']}" for e in events if e["responseStatus"]["code"] == 403]
    assert not forbidden, f"RBAC of deploy/ refused the operator: {forbidden}"


@pytest.fixture
def broken_day(project_dir: Path) -> Path:
    """A model that fails for one window only (2024-01-02): a bad day in production data."""
    path = project_dir / "models" / "facts" / "zz_e2e_broken.sql"
    path.write_text(
        "{{ config(materialized='table') }}\n"  # a view would never evaluate the division
        "select case when '{{ var('backfill_start_date') }}' = '2024-01-02' then 1/0 else 1 end as x\n"
    )
    return path
