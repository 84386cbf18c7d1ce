"""``kubectl dbf`` end to end: the real kubectl finds the installed ``kubectl-dbf`` on ``PATH``
and runs it against the real API server, while the operator (a process, as in test_operator.py)
runs small backfills whose chunks are real dbt runs. Nothing is mocked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import kubernetes.client
import pytest

from localcluster.cluster import LocalCluster
from tests.e2e.test_operator import OperatorProcess, backfill, create, get_backfill, status_of, wait_phase
from tests.support.polling import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

GLYPHS = {"■": "succeeded", "▶": "running", "↻": "retrying", "·": "pending", "✗": "failed", "-": "cancelled"}


def dbf(cluster: LocalCluster, *args: str, kubeconfig: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``kubectl dbf ARGS`` with the pinned kubectl, this venv's scripts first on PATH."""
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "KUBECONFIG": str(kubeconfig or cluster.kubeconfig),
        "COLUMNS": "160",
    }
    return subprocess.run(
        [str(cluster.kubectl_path), "dbf", *args], capture_output=True, text=True, env=env, check=False, timeout=120
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr}"
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess[str], exit_code: int = 2) -> str:
    assert result.returncode == exit_code, (result.returncode, result.stdout, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


def row_states(screen: str, label: str) -> list[str]:
    """The states of the heat map row starting with ``label``, read from its glyphs."""
    line = next(line for line in screen.splitlines() if line.startswith(label))
    return [GLYPHS[token] for token in line[len(label) :].split() if token in GLYPHS]


def test_status_logs_history_and_retry_of_a_failed_backfill(
    cluster: LocalCluster, kube_client: kubernetes.client.ApiClient, namespace: str, operator: OperatorProcess,
    analytics_db: str, broken_day: Path,
) -> None:  # fmt: skip
    create(kube_client, backfill(namespace, "flaky", "2024-01-01", "2024-01-03", retry={"limit": 0}))
    wait_phase(kube_client, operator, namespace, "flaky", "Failed")

    screen = ok(dbf(cluster, "status", "flaky", "-n", namespace, "--no-color"))
    assert screen.splitlines()[0] == f"{namespace}/flaky: Failed, 1/3 chunk(s) succeeded"
    # The week of Monday 1 January; no chunk starts once one has failed (parallelism 1).
    assert row_states(screen, "2024-01-01") == ["succeeded", "failed", "pending"]
    assert "✗ failed 1" in screen and "■ succeeded 1" in screen and "· pending 1" in screen
    assert "last failures" in screen and "division by zero" in screen

    logs = dbf(cluster, "logs", "flaky", "--date", "2024-01-02", "-n", namespace)
    assert "division by zero" in ok(logs)
    assert "chunk 1 (2024-01-02..2024-01-02), attempt 1" in logs.stderr
    assert "2024-01-01" in ok(dbf(cluster, "logs", "flaky", "--date", "2024-01-01", "-n", namespace))
    assert "no chunk covers 2024-03-01" in one_line_error(
        dbf(cluster, "logs", "flaky", "--date", "2024-03-01", "-n", namespace)
    )

    history = ok(dbf(cluster, "history", "flaky", "-n", namespace, "--database-url", analytics_db))
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in history.splitlines() if line.startswith("│")]
    rows = [r for r in cells if r and r[0]]  # a row's first line (folded error text continues below it)
    assert sorted((r[1], r[5]) for r in rows) == [("backfill", "failed"), ("chunk", "completed"), ("chunk", "failed")]
    assert "chunk" not in ok(dbf(cluster, "history", "other", "-n", namespace, "--database-url", analytics_db))

    broken_day.unlink()  # the data is fixed
    said = ok(dbf(cluster, "retry", "flaky", "-n", namespace))
    assert "spec.retryFailed None -> 'kubectl-dbf-" in said and "2024-01-02..2024-01-02" in said
    token = (get_backfill(kube_client, namespace, "flaky") or {})["spec"]["retryFailed"]
    wait_phase(kube_client, operator, namespace, "flaky", "Succeeded")
    screen = ok(dbf(cluster, "status", "flaky", "-n", namespace, "--no-color"))
    assert row_states(screen, "2024-01-01") == ["succeeded"] * 3
    assert "no failed chunk to retry" in ok(dbf(cluster, "retry", "flaky", "-n", namespace))
    assert (get_backfill(kube_client, namespace, "flaky") or {})["spec"]["retryFailed"] == token


def test_suspend_and_resume_of_a_tenant_matrix_and_one_line_errors(
    cluster: LocalCluster, kube_client: kubernetes.client.ApiClient, namespace: str, operator: OperatorProcess,
) -> None:  # fmt: skip
    tenants = ["tenant-001", "tenant-002"]
    create(kube_client, backfill(namespace, "pausable", "2024-01-01", "2024-01-02", tenantIds=tenants))
    wait_for(lambda: status_of(kube_client, namespace, "pausable").get("chunks", {}).get("succeeded", 0) >= 1,
             timeout=600, interval=0.2)  # fmt: skip

    said = ok(dbf(cluster, "suspend", "pausable", "-n", namespace))
    assert "spec.suspend false -> true" in said
    assert (get_backfill(kube_client, namespace, "pausable") or {})["spec"]["suspend"] is True
    wait_phase(kube_client, operator, namespace, "pausable", "Suspended")
    screen = ok(dbf(cluster, "status", "pausable", "-n", namespace, "--no-color"))
    header = next(line for line in screen.splitlines() if line.startswith("day"))
    assert header.split()[1:] == tenants  # a column per tenant
    states = row_states(screen, "2024-01-01 Mon") + row_states(screen, "2024-01-02 Tue")
    assert len(states) == 4 and "succeeded" in states and set(states) <= {"succeeded", "pending"}
    assert "already suspended" in ok(dbf(cluster, "suspend", "pausable", "-n", namespace))

    assert "spec.suspend true -> false" in ok(dbf(cluster, "resume", "pausable", "-n", namespace))
    wait_phase(kube_client, operator, namespace, "pausable", "Succeeded")
    screen = ok(dbf(cluster, "status", "pausable", "-n", namespace, "--no-color"))
    assert row_states(screen, "2024-01-01 Mon") == row_states(screen, "2024-01-02 Tue") == ["succeeded"] * 2
    logs = dbf(cluster, "logs", "pausable", "--date", "2024-01-02", "--tenant", "tenant-002", "-n", namespace)
    assert "tenant-002" in ok(logs)
    assert "pass --tenant" in one_line_error(dbf(cluster, "logs", "pausable", "--date", "2024-01-02", "-n", namespace))

    assert "not found" in one_line_error(dbf(cluster, "suspend", "nosuch", "-n", namespace))
    core = kubernetes.client.CoreV1Api(kube_client)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "nobody"}})
    nobody = cluster.service_account_kubeconfig(namespace, "nobody")
    assert "forbidden" in one_line_error(dbf(cluster, "resume", "pausable", "-n", namespace, kubeconfig=nobody))
    missing = one_line_error(dbf(cluster, "status", "pausable", "--kubeconfig", "/nonexistent/kubeconfig"))
    assert "kubeconfig" in missing
