"""The operator end to end: CR -> operator -> Jobs -> Pods -> runner -> dbt -> PostgreSQL -> status -> audit.

Real parts throughout: a real control plane (kube-apiserver with RBAC, the real Job, TTL and
garbage-collector controllers, the scheduler), the operator as its own process
(`dbt-backfill operator`) logged in as its ServiceAccount from ``deploy/`` (so the server enforces
the RBAC it ships with), and the node agent running each Pod's real command
(`python -m scripts.run_dbt_backfill`) against a real PostgreSQL with real dbt. Only the kubelet is
played (see `localcluster.node_agent`): Pods are host processes, with a per-test host "image" that
points dbt at the test's copy of the project. The fixtures (``operator``, ``analytics_db``,
``project_dir``, ``image`` ...) are in conftest.py, for every e2e module.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import kubernetes.client
import psycopg
import pytest

from localcluster.cluster import LocalCluster
from tests.e2e.conftest import GROUP, PLURAL, SECRET, VERSION
from tests.support.operator_process import OperatorProcess
from tests.support.polling import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def backfill(namespace: str, name: str, start: str, end: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "DbtBackfill",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"startDate": start, "endDate": end, "databaseSecretRef": {"name": SECRET}, **spec},
    }


def create(client: kubernetes.client.ApiClient, body: dict[str, Any]) -> None:
    namespace = body["metadata"]["namespace"]
    kubernetes.client.CustomObjectsApi(client).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)


def patch_spec(client: kubernetes.client.ApiClient, namespace: str, name: str, spec: dict[str, Any]) -> None:
    kubernetes.client.CustomObjectsApi(client).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name, {"spec": spec}, _content_type="application/merge-patch+json"
    )


def get_backfill(client: kubernetes.client.ApiClient, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        obj: dict[str, Any] = kubernetes.client.CustomObjectsApi(client).get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name
        )
    except kubernetes.client.ApiException as e:
        if e.status == 404:
            return None
        raise
    return obj


def status_of(client: kubernetes.client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    return dict((get_backfill(client, namespace, name) or {}).get("status") or {})


def succeeded(client: kubernetes.client.ApiClient, namespace: str, name: str) -> int:
    return int(status_of(client, namespace, name).get("chunks", {}).get("succeeded", 0))


def wait_phase(
    client: kubernetes.client.ApiClient, operator: OperatorProcess, namespace: str, name: str, phase: str,
    timeout: float = 600,
) -> dict[str, Any]:  # fmt: skip
    try:
        wait_for(lambda: status_of(client, namespace, name).get("phase") == phase, timeout=timeout, interval=0.2)
    except TimeoutError:
        status = status_of(client, namespace, name)
        pytest.fail(f"{name} never reached {phase}: status={status}\n{operator.logs()[-4000:]}")
    return status_of(client, namespace, name)


def jobs_of(client: kubernetes.client.ApiClient, namespace: str, name: str) -> list[dict[str, Any]]:
    response = kubernetes.client.BatchV1Api(client).list_namespaced_job(
        namespace, label_selector=f"dbt-backfill.io/backfill={name}", _preload_content=False
    )
    return list(json.loads(response.data)["items"])


def active_pods(client: kubernetes.client.ApiClient, namespace: str) -> list[str]:
    response = kubernetes.client.CoreV1Api(client).list_namespaced_pod(namespace, _preload_content=False)
    pods = json.loads(response.data)["items"]
    return [p["metadata"]["name"] for p in pods if p["status"].get("phase") in (None, "Pending", "Running")]


def audit_rows(url: str, name: str) -> list[dict[str, Any]]:
    with psycopg.connect(url) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute("select * from backfill_executions where backfill_name = %s order by created_at", (name,))
        return list(cur.fetchall())


def events_of(client: kubernetes.client.ApiClient, namespace: str, name: str) -> list[Any]:
    events = kubernetes.client.CoreV1Api(client).list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name},involvedObject.kind=DbtBackfill"
    )
    return list(events.items)


def event_reasons(client: kubernetes.client.ApiClient, namespace: str, name: str) -> set[str]:
    return {e.reason for e in events_of(client, namespace, name)}


def assert_events(client: kubernetes.client.ApiClient, namespace: str, name: str, *reasons: str) -> None:
    """Events are posted asynchronously by kopf, so give them a moment to arrive."""
    try:
        wait_for(lambda: set(reasons) <= event_reasons(client, namespace, name), timeout=60)
    except TimeoutError:
        pytest.fail(f"expected events {reasons} on {name}, got {event_reasons(client, namespace, name)}")


def completed_chunks(rows: list[dict[str, Any]]) -> Counter[int]:
    return Counter(r["chunk_index"] for r in rows if r["kind"] == "chunk" and r["status"] == "completed")


def max_concurrent(rows: list[dict[str, Any]]) -> int:
    """The most chunk runs that were executing at once, from their audit rows' start and end."""
    edges = [(r["created_at"], 1) for r in rows if r["kind"] == "chunk"]
    edges += [(r["finished_at"], -1) for r in rows if r["kind"] == "chunk" and r["finished_at"]]
    current = peak = 0
    for _, delta in sorted(edges):  # at equal times, -1 sorts first: touching runs do not overlap
        current += delta
        peak = max(peak, current)
    return peak


def test_ten_days_in_daily_chunks_succeed_with_bounded_parallelism(
    cluster: LocalCluster, kube_client: kubernetes.client.ApiClient, namespace: str,
    operator: OperatorProcess, analytics_db: str,
) -> None:  # fmt: skip
    # Ten chunks: more than three times the parallelism, so the operator must hold most of them back
    # (each chunk is a fresh runner process importing dbt; a month's run is benchmarks/operator_cluster).
    create(kube_client, backfill(namespace, "january", "2024-01-01", "2024-01-10", parallelism=3))
    status = wait_phase(kube_client, operator, namespace, "january", "Succeeded", timeout=900)

    assert status["progress"] == "10/10"
    assert status["chunks"] == {"total": 10, "succeeded": 10, "failed": 0, "running": 0, "pending": 0}
    assert status["succeededRanges"] == ["2024-01-01..2024-01-10"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Succeeded"]["status"] == "True"
    assert conditions["Running"]["status"] == "False"
    assert status["observedGeneration"] == 1
    assert status["recordsProcessed"] > 0
    rows = audit_rows(analytics_db, "january")
    assert 1 <= max_concurrent(rows) <= 3
    jobs = jobs_of(kube_client, namespace, "january")
    assert len({j["metadata"]["name"] for j in jobs}) == len(jobs) == 10
    assert all(j["status"].get("succeeded") == 1 for j in jobs)  # each counted by the real Job controller
    parent = [r for r in rows if r["kind"] == "backfill"]
    assert len(parent) == 1 and parent[0]["status"] == "completed"
    assert parent[0]["records_processed"] == status["recordsProcessed"]
    assert completed_chunks(rows) == Counter(range(10))
    assert all(r["parent_id"] == parent[0]["id"] for r in rows if r["kind"] == "chunk")
    with psycopg.connect(analytics_db) as conn:
        days = conn.execute("select count(distinct order_date) from analytics.fact_daily_revenue").fetchone()
    assert days == (10,)
    assert_events(kube_client, namespace, "january", "Started", "Succeeded")
    job = jobs[0]
    assert job["metadata"]["ownerReferences"][0]["kind"] == "DbtBackfill"
    assert job["spec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"]["name"] == SECRET

    # What a user sees with kubectl: the server-side printer columns, wait, describe with Events.
    table = cluster.kubectl("get", "dbf", "january", "-n", namespace, "-o", "wide").stdout.splitlines()
    assert table[0].split() == [
        "NAME", "PHASE", "PROGRESS", "TENANT", "TENANTS", "START", "END", "AGE", "FAILED", "RECORDS"
    ]  # fmt: skip
    row = table[1].split()
    assert row[:3] == ["january", "Succeeded", "10/10"]
    assert row[3:5] == ["2024-01-01", "2024-01-10"]  # no tenant, not a matrix: both columns are empty
    assert row[-2:] == ["0", str(status["recordsProcessed"])]
    waited = cluster.kubectl("wait", "--for=condition=Succeeded", "dbf/january", "-n", namespace, "--timeout=10s")
    assert "condition met" in waited.stdout
    described = cluster.kubectl("describe", "dbf", "january", "-n", namespace).stdout
    assert "Events:" in described
    assert "Started" in described and "Succeeded" in described


def test_a_failing_chunk_is_retried_then_fails_and_retry_failed_reruns_only_it(
    kube_client: kubernetes.client.ApiClient, namespace: str, operator: OperatorProcess, analytics_db: str,
    broken_day: Path,
) -> None:  # fmt: skip
    create(kube_client, backfill(namespace, "flaky", "2024-01-01", "2024-01-03", parallelism=1,
                                 retry={"limit": 1, "backoffSeconds": 1, "maxBackoffSeconds": 5}))  # fmt: skip
    status = wait_phase(kube_client, operator, namespace, "flaky", "Failed", timeout=600)

    assert status["chunks"]["failed"] == 1
    assert status["failedRanges"] == ["2024-01-02..2024-01-02"]
    assert "division by zero" in status["recentFailures"][-1]["message"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Succeeded"]["status"] == "False"
    assert "division by zero" in conditions["Succeeded"]["message"]
    jobs = jobs_of(kube_client, namespace, "flaky")
    runs_by_chunk = Counter(j["metadata"]["labels"]["dbt-backfill.io/chunk"] for j in jobs)
    assert runs_by_chunk["1"] == 2  # the first attempt and one retry
    failed_jobs = [j for j in jobs if j["metadata"]["labels"]["dbt-backfill.io/chunk"] == "1"]
    for failed_job in failed_jobs:  # failed as the real Job controller fails a Job
        types = {c["type"]: c["status"] for c in failed_job["status"]["conditions"]}
        assert types.get("FailureTarget") == "True" and types.get("Failed") == "True"
    rows = audit_rows(analytics_db, "flaky")
    failed = [r for r in rows if r["kind"] == "chunk" and r["status"] == "failed"]
    assert len(failed) == 2 and all("division by zero" in r["error_message"] for r in failed)
    parent = next(r for r in rows if r["kind"] == "backfill")
    assert parent["status"] == "failed"
    assert_events(kube_client, namespace, "flaky", "ChunkRetry", "ChunkFailed", "Failed")

    before = {j["metadata"]["name"] for j in jobs}
    broken_day.unlink()  # the data is fixed
    patch_spec(kube_client, namespace, "flaky", {"retryFailed": "fix-1"})
    status = wait_phase(kube_client, operator, namespace, "flaky", "Succeeded", timeout=600)

    new_jobs = [j for j in jobs_of(kube_client, namespace, "flaky") if j["metadata"]["name"] not in before]
    assert [j["metadata"]["labels"]["dbt-backfill.io/chunk"] for j in new_jobs] == ["1"]
    assert status["progress"] == "3/3"
    assert completed_chunks(audit_rows(analytics_db, "flaky")) == Counter({0: 1, 1: 1, 2: 1})
    assert next(r for r in audit_rows(analytics_db, "flaky") if r["kind"] == "backfill")["status"] == "completed"


def test_a_chunk_the_contract_check_refuses_fails_with_the_refusal_in_the_status_and_touches_no_data(
    kube_client: kubernetes.client.ApiClient, namespace: str, operator: OperatorProcess, analytics_db: str,
    project_dir: Path,
) -> None:  # fmt: skip
    # A model that never reads the window: every chunk would rebuild it from all orders.
    (project_dir / "models" / "facts" / "zz_e2e_no_window.sql").write_text(
        "{{ config(materialized='incremental', incremental_strategy='delete+insert',"
        " unique_key=['tenant_id', 'order_id'], pre_hook=\"{{ backfill_delete_window('ordered_at') }}\") }}\n"
        "select tenant_id, order_id, ordered_at, amount from {{ source('raw', 'orders') }}\n"
    )
    # Retries allowed, yet the refusal (exit 3) would recur on each: the chunk fails on its first attempt.
    create(kube_client, backfill(namespace, "refused", "2024-01-05", "2024-01-05",
                                 retry={"limit": 2, "backoffSeconds": 1}))  # fmt: skip
    status = wait_phase(kube_client, operator, namespace, "refused", "Failed", timeout=600)
    [job] = jobs_of(kube_client, namespace, "refused")
    assert job["metadata"]["labels"]["dbt-backfill.io/attempt"] == "1"
    failed = {c["type"]: c for c in job["status"]["conditions"]}["Failed"]
    assert (failed["status"], failed["reason"]) == ("True", "PodFailurePolicy")
    assert "exit code 3" in failed["message"]
    assert_events(kube_client, namespace, "refused", "ChunkFailed")
    [chunk_failed] = [e for e in events_of(kube_client, namespace, "refused") if e.reason == "ChunkFailed"]
    assert "was refused, not retried" in chunk_failed.message

    refusal = "model zz_e2e_no_window: never reads the window"
    [failure] = status["recentFailures"]
    assert refusal in failure["message"] and "pass --allow-full-rebuild" in failure["message"], failure
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Succeeded"]["status"] == "False" and refusal in conditions["Succeeded"]["message"]
    [chunk] = [r for r in audit_rows(analytics_db, "refused") if r["kind"] == "chunk"]
    assert (chunk["status"], chunk["records_processed"], chunk["attempt"]) == ("failed", 0, 1)
    assert chunk["error_message"] == failure["message"]
    with psycopg.connect(analytics_db) as conn:  # refused before dbt ran: no fact table was even created
        tables = conn.execute("select tablename from pg_tables where schemaname = 'analytics'").fetchall()
    assert tables == []


def test_suspend_stops_launching_and_resume_finishes(
    kube_client: kubernetes.client.ApiClient, namespace: str, operator: OperatorProcess, analytics_db: str
) -> None:
    # Five chunks, one at a time: suspended once the first has succeeded, most are still to be launched.
    create(kube_client, backfill(namespace, "pausable", "2024-01-01", "2024-01-05", parallelism=1))
    wait_for(lambda: status_of(kube_client, namespace, "pausable").get("chunks", {}).get("succeeded", 0) >= 1,
             timeout=600, interval=0.2)  # fmt: skip
    patch_spec(kube_client, namespace, "pausable", {"suspend": True})
    status = wait_phase(kube_client, operator, namespace, "pausable", "Suspended", timeout=600)
    assert {c["type"]: c["status"] for c in status["conditions"]}["Suspended"] == "True"
    wait_for(lambda: not active_pods(kube_client, namespace), timeout=600)
    launched = len(jobs_of(kube_client, namespace, "pausable"))
    time.sleep(2)  # a suspended backfill must stay quiet
    assert len(jobs_of(kube_client, namespace, "pausable")) <= launched
    assert not active_pods(kube_client, namespace)
    assert status_of(kube_client, namespace, "pausable")["phase"] == "Suspended"

    patch_spec(kube_client, namespace, "pausable", {"suspend": False})
    status = wait_phase(kube_client, operator, namespace, "pausable", "Succeeded", timeout=600)
    assert status["progress"] == "5/5"
    assert set(completed_chunks(audit_rows(analytics_db, "pausable"))) == set(range(5))
    assert_events(kube_client, namespace, "pausable", "Suspended", "Resumed", "Succeeded")


def test_deleting_a_running_backfill_deletes_its_jobs_and_cancels_the_audit_row(
    kube_client: kubernetes.client.ApiClient, namespace: str, operator: OperatorProcess, analytics_db: str
) -> None:
    create(kube_client, backfill(namespace, "doomed", "2024-01-01", "2024-01-20", parallelism=2))
    wait_for(lambda: status_of(kube_client, namespace, "doomed").get("chunks", {}).get("succeeded", 0) >= 2,
             timeout=600, interval=0.2)  # fmt: skip
    kubernetes.client.CustomObjectsApi(kube_client).delete_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "doomed"
    )
    wait_for(lambda: get_backfill(kube_client, namespace, "doomed") is None, timeout=600,
             message=lambda: operator.logs()[-3000:])  # fmt: skip
    wait_for(lambda: not jobs_of(kube_client, namespace, "doomed"), timeout=600)  # the real garbage collector
    wait_for(lambda: not active_pods(kube_client, namespace), timeout=600)
    parent = next(r for r in audit_rows(analytics_db, "doomed") if r["kind"] == "backfill")
    assert parent["status"] == "cancelled"
    assert len(completed_chunks(audit_rows(analytics_db, "doomed"))) < 20


def test_an_overlapping_backfill_queues_until_the_first_one_ends(
    kube_client: kubernetes.client.ApiClient, namespace: str, operator: OperatorProcess, analytics_db: str
) -> None:
    # Three days one at a time: "second" is created (overlapping its last day) while "first" runs.
    create(kube_client, backfill(namespace, "first", "2024-01-01", "2024-01-03", parallelism=1))
    wait_for(lambda: status_of(kube_client, namespace, "first").get("phase") == "Running", timeout=600)
    create(kube_client, backfill(namespace, "second", "2024-01-03", "2024-01-04", tenantId="tenant-001"))
    create(kube_client, backfill(namespace, "elsewhere", "2024-01-20", "2024-01-20"))

    status = wait_phase(kube_client, operator, namespace, "second", "Queued", timeout=600)
    assert status["queuedBehind"] == "first"
    assert "first" in {c["type"]: c for c in status["conditions"]}["Succeeded"]["message"]
    assert not jobs_of(kube_client, namespace, "second")
    wait_phase(kube_client, operator, namespace, "elsewhere", "Succeeded", timeout=600)  # no overlap: not held back

    wait_phase(kube_client, operator, namespace, "first", "Succeeded", timeout=600)
    wait_phase(kube_client, operator, namespace, "second", "Succeeded", timeout=600)
    first_end = max(r["finished_at"] for r in audit_rows(analytics_db, "first") if r["kind"] == "chunk")
    second_start = min(r["created_at"] for r in audit_rows(analytics_db, "second") if r["kind"] == "chunk")
    assert second_start >= first_end  # never wrote the same window at once


@pytest.mark.parametrize("operator_scope", [["--all-namespaces"]])
def test_killing_the_operator_mid_run_never_duplicates_or_loses_a_chunk(
    kube_client: kubernetes.client.ApiClient, namespace: str, operator: OperatorProcess, analytics_db: str
) -> None:
    """Also: the operator as deploy/ runs it, cluster-wide (``--all-namespaces``) with its ClusterRoles."""
    create(kube_client, backfill(namespace, "sturdy", "2024-01-01", "2024-01-12", parallelism=3))
    for target in (2, 6):
        wait_for(lambda t=target: succeeded(kube_client, namespace, "sturdy") >= t, timeout=600, interval=0.1)
        operator.kill()
        time.sleep(1.0)  # Jobs finish while nobody watches
        operator.start()
    status = wait_phase(kube_client, operator, namespace, "sturdy", "Succeeded", timeout=600)

    assert status["progress"] == "12/12"
    names = [j["metadata"]["name"] for j in jobs_of(kube_client, namespace, "sturdy")]
    assert len(names) == len(set(names))
    assert len(names) == 12  # one Job per chunk: no duplicate, none lost
    assert completed_chunks(audit_rows(analytics_db, "sturdy")) == Counter(range(12))


@pytest.mark.parametrize(
    ("spec_change", "reason"),
    [
        ({"startDate": "2024-02-01", "endDate": "2024-01-01"}, "endDate must be on or after startDate"),
        ({"tenantId": "x' or '1'='1"}, "spec.tenantId"),
        ({"databaseSecretRef": None}, "spec.databaseSecretRef: Required value"),
    ],
)
def test_the_api_server_refuses_an_invalid_spec_so_no_job_is_ever_created(
    kube_client: kubernetes.client.ApiClient, namespace: str, spec_change: dict[str, Any], reason: str
) -> None:
    """The CRD's schema and CEL rules run in the real API server (the operator's InvalidSpec path,
    for a server without validation, is unit-tested)."""
    body = backfill(namespace, "invalid", "2024-01-01", "2024-01-02")
    body["spec"].update(spec_change)
    body["spec"] = {k: v for k, v in body["spec"].items() if v is not None}
    with pytest.raises(kubernetes.client.ApiException) as refused:
        create(kube_client, body)
    assert refused.value.status == 422
    assert reason in json.loads(refused.value.body)["message"]
    assert get_backfill(kube_client, namespace, "invalid") is None
