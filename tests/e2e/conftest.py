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

One cluster serves the whole session (it starts in a few seconds); tests isolate by namespace.
Its state lives in a temporary directory of its own (`tests.support.session_clusters`);
``LOCALCLUSTER_KEEP=1`` keeps it. ``podman_cluster`` (tests/conftest.py) is a second one whose
node runs Pods in their images with podman.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import kubernetes.client
import pytest

from localcluster.cluster import LocalCluster
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
