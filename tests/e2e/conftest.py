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
Its state lives in a temporary directory of its own, not under pytest's temp root, which another
pytest session on the machine may prune while this one runs. ``LOCALCLUSTER_KEEP=1`` keeps it.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import kubernetes.client
import pytest

from localcluster.cluster import LocalCluster
from localcluster.controlplane import MissingBinariesError, check_binaries, default_bin_dir

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = REPO_ROOT / "crds" / "dbtbackfills.dbt-backfill.io.yaml"
_namespace_counter = itertools.count()


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    try:
        check_binaries(default_bin_dir())
    except MissingBinariesError as e:
        pytest.fail(f"{e} (run `make cluster-bin`)", pytrace=False)
    state_dir = Path(tempfile.mkdtemp(prefix="localcluster-"))
    local = LocalCluster(state_dir, die_with_parent=True, agent_options=("--restart-backoff-seconds=1",))
    try:
        local.up()
        local.kubectl("apply", "--server-side", "-f", str(CRD_PATH))
        local.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(CRD_PATH))
        yield local
    finally:
        local.down()
        if os.environ.get("LOCALCLUSTER_KEEP") != "1":
            shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def kube_client(cluster: LocalCluster) -> Iterator[kubernetes.client.ApiClient]:
    with cluster.api_client() as client:
        yield client


@pytest.fixture
def namespace(
    cluster: LocalCluster, kube_client: kubernetes.client.ApiClient, request: pytest.FixtureRequest
) -> Iterator[str]:
    """A namespace of its own, named after the test; deleted (without waiting) afterwards."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:45].rstrip("-")
    name = f"{slug}-{next(_namespace_counter)}"
    core = kubernetes.client.CoreV1Api(kube_client)
    core.create_namespace({"metadata": {"name": name}})
    # Pods need the namespace's `default` ServiceAccount, which the controller manager adds.
    deadline = time.monotonic() + 30
    while True:
        try:
            core.read_namespaced_service_account("default", name)
            break
        except kubernetes.client.ApiException as e:
            if e.status != 404 or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    try:
        yield name
    finally:
        core.delete_namespace(name)


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
