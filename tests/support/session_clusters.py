"""A whole `LocalCluster` for a test session: started once, with the project's CRD, torn down after.

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
from contextlib import contextmanager
from pathlib import Path

import kubernetes.client
import pytest

from localcluster.cluster import LocalCluster
from localcluster.controlplane import MissingBinariesError, check_binaries, default_bin_dir
from tests.support.polling import wait_established

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = REPO_ROOT / "crds" / "dbtbackfills.dbt-backfill.io.yaml"
# The kubelet's 10 s first CrashLoopBackOff would make every restart test wait; 1 s keeps its shape.
AGENT_OPTIONS = ("--restart-backoff-seconds=1",)
_namespace_counter = itertools.count()


@contextmanager
def session_cluster(runtime: str, *, prefix: str = "localcluster-") -> Iterator[LocalCluster]:
    try:
        check_binaries(default_bin_dir())
    except MissingBinariesError as e:
        pytest.fail(f"{e} (run `make cluster-bin`)", pytrace=False)
    state_dir = Path(tempfile.mkdtemp(prefix=prefix))
    local = LocalCluster(state_dir, die_with_parent=True, agent_options=AGENT_OPTIONS, runtime=runtime)
    try:
        local.up()
        local.kubectl("apply", "--server-side", "-f", str(CRD_PATH))
        with local.api_client() as client:
            wait_established(client, "dbtbackfills.dbt-backfill.io")
        yield local
    finally:
        local.down()
        if os.environ.get("LOCALCLUSTER_KEEP") != "1":
            shutil.rmtree(state_dir, ignore_errors=True)


@contextmanager
def fresh_namespace(client: kubernetes.client.ApiClient, request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace named after the test, with its ``default`` ServiceAccount; deleted (without waiting) after."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:45].rstrip("-")
    name = f"{slug}-{next(_namespace_counter)}"
    core = kubernetes.client.CoreV1Api(client)
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
