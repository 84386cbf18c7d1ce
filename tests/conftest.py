"""Shared fixtures: one real PostgreSQL server per test session, a fresh database per test, and
``podman_cluster``: a session `LocalCluster` whose node agent runs each Pod's containers with
podman, in their images, on the host network (`localcluster.podman_runtime`), with
``podman_kube_client`` (admin) and ``podman_namespace`` (a fresh namespace per test) on it. They
serve tests/e2e and tests/image alike (tests that use them need podman: mark them ``image``); the
e2e ``cluster`` fixture is another cluster, whose node runs containers as host processes.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import kubernetes.client
import psycopg
import pytest

from dbtbackfill.demo.localpg import LocalPostgres
from localcluster.cluster import LocalCluster
from tests.support.session_clusters import fresh_namespace, session_cluster

REPO_ROOT = Path(__file__).resolve().parent.parent
_db_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[LocalPostgres]:
    """A real PostgreSQL server, started in a temporary directory on a free loopback port.

    Its directory is its own (removed on stop), not under pytest's temp root: that root can
    be reset to mode 0700 by another pytest session, locking out the server's user.
    """
    server = LocalPostgres()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def create_database(server: LocalPostgres, name: str) -> str:
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute(f'drop database if exists "{name}" with (force)')
        conn.execute(f'create database "{name}" template template0')
    return server.url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture
def database_url(pg_server: LocalPostgres) -> str:
    """A URL to an empty database of its own, so tests stay independent."""
    return create_database(pg_server, f"t{os.getpid()}_{next(_db_counter)}")


@pytest.fixture(scope="session")
def podman_cluster() -> Iterator[LocalCluster]:
    """A started cluster (CRD installed) whose Pods run in their images from local podman storage.

    Images are not built here: use the ``image`` fixture of tests/image for the project's image,
    or any image already in podman storage (``imagePullPolicy: Never`` or ``IfNotPresent``).
    """
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: the podman cluster needs it (.ci/run installs it)")
    with session_cluster("podman", prefix="localcluster-podman-") as local:
        yield local


@pytest.fixture(scope="session")
def podman_kube_client(podman_cluster: LocalCluster) -> Iterator[kubernetes.client.ApiClient]:
    with podman_cluster.api_client() as client:
        yield client


@pytest.fixture
def podman_namespace(podman_kube_client: kubernetes.client.ApiClient, request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace of its own on ``podman_cluster``, named after the test; deleted (without waiting) after."""
    with fresh_namespace(podman_kube_client, request) as name:
        yield name
