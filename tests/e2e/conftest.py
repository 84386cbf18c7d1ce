"""Fixtures for end-to-end tests: an HTTP Kubernetes API (kmock-based emulator) and a test kubelet.

- ``kube_api``: a started `KubeAPI` (``.url``, ``.kubeconfig``, ``.get/.list/.events/.history``,
  ``.writes()``/``.reset_counts()``, ``.api_client()``...). Its CRDs come from ``kube_api_crds``.
  Teardown fails the test if the emulator itself crashed on a request (a 5xx from a bug).
- ``kube_client``: an official-client ``ApiClient`` logged in via ``kube_api.kubeconfig``.
- ``kubelet``: a started `Kubelet` running the Jobs of ``default`` as subprocesses in the repo
  root, with ``kubelet_env`` added to their environment and ``kubelet_options`` as its options.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest

from tests.support.kubeapi import MINIMAL_DBT_BACKFILL_CRD, CRDSource, KubeAPI, load_crds
from tests.support.kubelet import Kubelet

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = REPO_ROOT / "crds" / "dbtbackfills.dbt-backfill.io.yaml"


@pytest.fixture
def kube_api_crds() -> list[CRDSource]:
    """The CRDs registered in ``kube_api``: the project's CRD file, or a minimal one if absent."""
    if CRD_PATH.exists():
        crds = load_crds(CRD_PATH)
        assert crds, f"{CRD_PATH} holds no CustomResourceDefinition"
        return list(crds)
    return [MINIMAL_DBT_BACKFILL_CRD]


@pytest.fixture
def kube_api(kube_api_crds: list[CRDSource], tmp_path: Path) -> Iterator[KubeAPI]:
    workdir = tmp_path / "kubeapi"
    workdir.mkdir()
    api = KubeAPI(crds=kube_api_crds, workdir=workdir).start()
    try:
        yield api
        errors = api.server_errors()
    finally:
        api.stop()
    if errors:
        pytest.fail(f"the Kubernetes API emulator failed internally: {errors!r}")


@pytest.fixture
def kube_client(kube_api: KubeAPI) -> kubernetes.client.ApiClient:
    return kube_api.api_client()  # closed when kube_api stops


@pytest.fixture
def kubelet_env() -> dict[str, str]:
    """Extra environment for the Jobs' subprocesses (e.g. DATABASE_URL); override as needed."""
    return {}


@pytest.fixture
def kubelet_options() -> dict[str, Any]:
    """Options for `Kubelet` (max_parallel, poll_interval, namespace...); override as needed."""
    return {}


@pytest.fixture
def kubelet(kube_api: KubeAPI, kubelet_env: dict[str, str], kubelet_options: dict[str, Any]) -> Iterator[Kubelet]:
    options: dict[str, Any] = {"namespace": "default", "cwd": REPO_ROOT, "max_parallel": 4} | kubelet_options
    kubelet = Kubelet(kube_api.kubeconfig, env=kubelet_env, **options).start()
    try:
        yield kubelet
    finally:
        kubelet.stop()
    if kubelet.errors:
        pytest.fail(f"the test kubelet failed: {kubelet.errors!r}")
