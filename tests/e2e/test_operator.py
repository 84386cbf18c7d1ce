"""The operator end to end: CR -> operator -> Jobs -> runner -> dbt -> PostgreSQL -> status -> audit.

Real parts throughout: the operator runs as its own process (`dbt-backfill operator`),
talking HTTP to a Kubernetes API (kmock with the documented shim in tests/support);
the test kubelet runs each Job's real command (`python -m scripts.run_dbt_backfill`)
against a real PostgreSQL with real dbt. What cannot exist here is emulated: the API
server and the kubelet (no cluster on this machine).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import kubernetes.client
import psycopg
import pytest

from dbtbackfill.demo import load_demo_data
from dbtbackfill.kube import USER_AGENT
from tests.support.kubeapi import KubeAPI
from tests.support.kubelet import Kubelet
from tests.unit.test_deploy import granted_calls

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

REPO_ROOT = Path(__file__).resolve().parents[2]
GROUP, VERSION, PLURAL = "dbt-backfill.io", "v1alpha1", "dbtbackfills"
SECRET = "analytics-db"


class OperatorProcess:
    """`dbt-backfill operator` as a subprocess, so a test can kill -9 it and start it again."""

    def __init__(self, kube_api: KubeAPI, database_url: str, log_dir: Path) -> None:
        self.env = os.environ | {
            "KUBECONFIG": str(kube_api.kubeconfig),
            "DATABASE_URL": database_url,
            "DBT_BACKFILL_DEFAULT_IMAGE": "dbt-backfill-operator:test",
            "DBT_BACKFILL_WATCH_TIMEOUT_SECONDS": "30",
        }
        self.log_dir = log_dir
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = (self.log_dir / f"operator-{self.starts}.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dbtbackfill.cli", "operator", "--namespace", "default",
             "--liveness-port", "0", "--metrics-port", "0"],
            cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("operator-*.log")))


@pytest.fixture
def analytics_db(database_url: str) -> str:
    load_demo_data(database_url, tenants=2, start_date=date(2024, 1, 1), days=31, rows_per_day=4)
    return database_url


@pytest.fixture
def project_dir(tmp_path: Path) -> Path:
    """A private copy of the dbt project, so a test can break a model without touching others."""
    copy = tmp_path / "analytics"
    shutil.copytree(REPO_ROOT / "analytics", copy, ignore=shutil.ignore_patterns("target", "logs"))
    return copy


@pytest.fixture
def kubelet_env(analytics_db: str, project_dir: Path, tmp_path: Path) -> dict[str, str]:
    # The Job's /tmp is an emptyDir in a cluster; here each run shares the host, so dbt's
    # files go to the test's own directory instead.
    return {
        "DBT_PROJECT_DIR": str(project_dir),
        "DBT_PROFILES_DIR": str(project_dir),
        "DBT_TARGET_PATH": str(tmp_path / "dbt-target"),
        "DBT_LOG_PATH": str(tmp_path / "dbt-logs"),
    }


@pytest.fixture
def kubelet_options() -> dict[str, Any]:
    return {"max_parallel": 8, "poll_interval": 0.1}


@pytest.fixture
def operator(kube_api: KubeAPI, kube_client: kubernetes.client.ApiClient, analytics_db: str,
             tmp_path: Path) -> Iterator[OperatorProcess]:  # fmt: skip
    kubernetes.client.CoreV1Api(kube_client).create_namespaced_secret(
        "default", {"metadata": {"name": SECRET}, "stringData": {"DATABASE_URL": analytics_db}}
    )
    proc = OperatorProcess(kube_api, analytics_db, tmp_path)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
    assert_operator_calls_are_granted(kube_api)


# What each kind the API server counts is, as RBAC names it: (apiGroups, resource).
RBAC_NAMES = {
    "DbtBackfill": (("dbt-backfill.io",), "dbtbackfills"),
    "Job": (("batch",), "jobs"),
    "Event": (("", "events.k8s.io"), "events"),
    "Namespace": (("",), "namespaces"),
    "Pod": (("",), "pods"),
    "CustomResourceDefinition": (("apiextensions.k8s.io",), "customresourcedefinitions"),
}


def assert_operator_calls_are_granted(kube_api: KubeAPI) -> None:
    """Every request the operator made (kopf's and our client's) is allowed by deploy/'s RBAC."""
    granted = granted_calls()
    observed = kube_api.counts(agents=["kopf/", USER_AGENT])
    assert observed, "the operator made no API calls at all"
    for kind, verb in observed:
        if kind not in RBAC_NAMES:
            assert verb == "get" and kind in ("", "api", "apis", "version"), f"unexpected call {kind} {verb}"
            continue  # discovery: allowed to every authenticated user
        groups, resource = RBAC_NAMES[kind]
        base_verb, _, sub = verb.partition("/")
        name = f"{resource}/{sub}" if sub else resource
        assert any((g, name, base_verb) in granted for g in groups), f"RBAC does not grant {verb} on {name}"


def backfill(name: str, start: str, end: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "DbtBackfill",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"startDate": start, "endDate": end, "databaseSecretRef": {"name": SECRET}, **spec},
    }


def create(client: kubernetes.client.ApiClient, body: dict[str, Any]) -> None:
    kubernetes.client.CustomObjectsApi(client).create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, body)


def patch_spec(client: kubernetes.client.ApiClient, name: str, spec: dict[str, Any]) -> None:
    kubernetes.client.CustomObjectsApi(client).patch_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, name, {"spec": spec}, _content_type="application/merge-patch+json"
    )


def status_of(kube_api: KubeAPI, name: str) -> dict[str, Any]:
    obj = kube_api.get(f"{GROUP}/{VERSION}/{PLURAL}", name)
    return dict((obj or {}).get("status") or {})


def wait_phase(
    kube_api: KubeAPI, operator: OperatorProcess, name: str, phase: str, timeout: float = 120
) -> dict[str, Any]:
    try:
        kube_api.wait_for(lambda: status_of(kube_api, name).get("phase") == phase, timeout=timeout, interval=0.2)
    except TimeoutError:
        pytest.fail(f"{name} never reached {phase}: status={status_of(kube_api, name)}\n{operator.logs()[-4000:]}")
    return status_of(kube_api, name)


def jobs_of(kube_api: KubeAPI, name: str) -> list[dict[str, Any]]:
    return [j for j in kube_api.list_objects("batch/v1/jobs", "default")
            if j["metadata"]["labels"].get("dbt-backfill.io/backfill") == name]  # fmt: skip


def audit_rows(url: str, name: str) -> list[dict[str, Any]]:
    with psycopg.connect(url) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute("select * from backfill_executions where backfill_name = %s order by created_at", (name,))
        return list(cur.fetchall())


def assert_events(kube_api: KubeAPI, name: str, *reasons: str) -> None:
    """Events are posted asynchronously by kopf, so give them a moment to arrive."""

    def seen() -> bool:
        posted = {e["reason"] for e in kube_api.events("default", involved_name=name)}
        return set(reasons) <= posted

    try:
        kube_api.wait_for(seen, timeout=15, interval=0.1)
    except TimeoutError:
        posted = [e["reason"] for e in kube_api.events("default", involved_name=name)]
        pytest.fail(f"expected events {reasons} on {name}, got {posted}")


def completed_chunks(rows: list[dict[str, Any]]) -> Counter[int]:
    return Counter(r["chunk_index"] for r in rows if r["kind"] == "chunk" and r["status"] == "completed")


def test_a_month_in_daily_chunks_succeeds_with_bounded_parallelism(
    kube_api: KubeAPI, kube_client: kubernetes.client.ApiClient, kubelet: Kubelet,
    operator: OperatorProcess, analytics_db: str,
) -> None:  # fmt: skip
    create(kube_client, backfill("january", "2024-01-01", "2024-01-31", parallelism=3))
    status = wait_phase(kube_api, operator, "january", "Succeeded", timeout=240)

    assert status["progress"] == "31/31"
    assert status["chunks"] == {"total": 31, "succeeded": 31, "failed": 0, "running": 0, "pending": 0}
    assert status["succeededRanges"] == ["2024-01-01..2024-01-31"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Succeeded"]["status"] == "True"
    assert conditions["Running"]["status"] == "False"
    assert status["observedGeneration"] == 1
    assert status["recordsProcessed"] > 0
    assert 1 <= kubelet.max_concurrent() <= 3
    names = [r.name for r in kubelet.runs]
    assert len(names) == len(set(names)) == 31
    rows = audit_rows(analytics_db, "january")
    parent = [r for r in rows if r["kind"] == "backfill"]
    assert len(parent) == 1 and parent[0]["status"] == "completed"
    assert parent[0]["records_processed"] == status["recordsProcessed"]
    assert completed_chunks(rows) == Counter(range(31))
    assert all(r["parent_id"] == parent[0]["id"] for r in rows if r["kind"] == "chunk")
    with psycopg.connect(analytics_db) as conn:
        days = conn.execute("select count(distinct order_date) from analytics.fact_daily_revenue").fetchone()
    assert days == (31,)
    assert_events(kube_api, "january", "Started", "Succeeded")
    job = jobs_of(kube_api, "january")[0]
    assert job["metadata"]["ownerReferences"][0]["kind"] == "DbtBackfill"
    assert job["spec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"]["name"] == SECRET


@pytest.fixture
def broken_day(project_dir: Path) -> Path:
    """A model that fails for one window only (2024-01-02): a bad day in production data."""
    path = project_dir / "models" / "facts" / "zz_e2e_broken.sql"
    path.write_text(
        "{{ config(materialized='table') }}\n"  # a view would never evaluate the division
        "select case when '{{ var('backfill_start_date') }}' = '2024-01-02' then 1/0 else 1 end as x\n"
    )
    return path


def test_a_failing_chunk_is_retried_then_fails_and_retry_failed_reruns_only_it(
    kube_api: KubeAPI, kube_client: kubernetes.client.ApiClient, kubelet: Kubelet,
    operator: OperatorProcess, analytics_db: str, broken_day: Path,
) -> None:  # fmt: skip
    create(kube_client, backfill("flaky", "2024-01-01", "2024-01-03", parallelism=1,
                                 retry={"limit": 1, "backoffSeconds": 1}))  # fmt: skip
    status = wait_phase(kube_api, operator, "flaky", "Failed", timeout=180)

    assert status["chunks"]["failed"] == 1
    assert status["failedRanges"] == ["2024-01-02..2024-01-02"]
    assert "division by zero" in status["recentFailures"][-1]["message"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Succeeded"]["status"] == "False"
    assert "division by zero" in conditions["Succeeded"]["message"]
    runs_by_chunk = Counter(j["metadata"]["labels"]["dbt-backfill.io/chunk"] for j in jobs_of(kube_api, "flaky"))
    assert runs_by_chunk["1"] == 2  # the first attempt and one retry
    rows = audit_rows(analytics_db, "flaky")
    failed = [r for r in rows if r["kind"] == "chunk" and r["status"] == "failed"]
    assert len(failed) == 2 and all("division by zero" in r["error_message"] for r in failed)
    parent = next(r for r in rows if r["kind"] == "backfill")
    assert parent["status"] == "failed"
    assert_events(kube_api, "flaky", "ChunkRetry", "ChunkFailed", "Failed")

    before = {j["metadata"]["name"] for j in jobs_of(kube_api, "flaky")}
    broken_day.unlink()  # the data is fixed
    patch_spec(kube_client, "flaky", {"retryFailed": "fix-1"})
    status = wait_phase(kube_api, operator, "flaky", "Succeeded", timeout=120)

    new_jobs = [j for j in jobs_of(kube_api, "flaky") if j["metadata"]["name"] not in before]
    assert [j["metadata"]["labels"]["dbt-backfill.io/chunk"] for j in new_jobs] == ["1"]
    assert status["progress"] == "3/3"
    assert completed_chunks(audit_rows(analytics_db, "flaky")) == Counter({0: 1, 1: 1, 2: 1})
    assert next(r for r in audit_rows(analytics_db, "flaky") if r["kind"] == "backfill")["status"] == "completed"


def test_suspend_stops_launching_and_resume_finishes(
    kube_api: KubeAPI, kube_client: kubernetes.client.ApiClient, kubelet: Kubelet,
    operator: OperatorProcess, analytics_db: str,
) -> None:  # fmt: skip
    create(kube_client, backfill("pausable", "2024-01-01", "2024-01-08", parallelism=1))
    kube_api.wait_for(lambda: status_of(kube_api, "pausable").get("chunks", {}).get("succeeded", 0) >= 1,
                      timeout=90, interval=0.2)  # fmt: skip
    patch_spec(kube_client, "pausable", {"suspend": True})
    status = wait_phase(kube_api, operator, "pausable", "Suspended", timeout=60)
    assert {c["type"]: c["status"] for c in status["conditions"]}["Suspended"] == "True"
    kube_api.wait_for(lambda: not kubelet.running(), timeout=30)
    launched = len(jobs_of(kube_api, "pausable"))
    time.sleep(2)  # a suspended backfill must stay quiet
    assert len(jobs_of(kube_api, "pausable")) <= launched
    assert not kubelet.running()
    assert status_of(kube_api, "pausable")["phase"] == "Suspended"

    patch_spec(kube_client, "pausable", {"suspend": False})
    status = wait_phase(kube_api, operator, "pausable", "Succeeded", timeout=120)
    assert status["progress"] == "8/8"
    assert set(completed_chunks(audit_rows(analytics_db, "pausable"))) == set(range(8))
    assert_events(kube_api, "pausable", "Suspended", "Resumed", "Succeeded")


def test_deleting_a_running_backfill_deletes_its_jobs_and_cancels_the_audit_row(
    kube_api: KubeAPI, kube_client: kubernetes.client.ApiClient, kubelet: Kubelet,
    operator: OperatorProcess, analytics_db: str,
) -> None:  # fmt: skip
    create(kube_client, backfill("doomed", "2024-01-01", "2024-01-20", parallelism=2))
    kube_api.wait_for(lambda: status_of(kube_api, "doomed").get("chunks", {}).get("succeeded", 0) >= 2,
                      timeout=90, interval=0.2)  # fmt: skip
    kubernetes.client.CustomObjectsApi(kube_client).delete_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, "doomed"
    )
    kube_api.wait_for(lambda: kube_api.get(f"{GROUP}/{VERSION}/{PLURAL}", "doomed") is None, timeout=60,
                      message=operator.logs()[-3000:])  # fmt: skip
    kube_api.wait_for(lambda: not jobs_of(kube_api, "doomed"), timeout=30)
    kube_api.wait_for(lambda: not kubelet.running(), timeout=30)
    parent = next(r for r in audit_rows(analytics_db, "doomed") if r["kind"] == "backfill")
    assert parent["status"] == "cancelled"
    assert len(completed_chunks(audit_rows(analytics_db, "doomed"))) < 20


def test_an_overlapping_backfill_queues_until_the_first_one_ends(
    kube_api: KubeAPI, kube_client: kubernetes.client.ApiClient, kubelet: Kubelet,
    operator: OperatorProcess, analytics_db: str,
) -> None:  # fmt: skip
    create(kube_client, backfill("first", "2024-01-01", "2024-01-05", parallelism=1))
    kube_api.wait_for(lambda: status_of(kube_api, "first").get("phase") == "Running", timeout=60, interval=0.1)
    create(kube_client, backfill("second", "2024-01-04", "2024-01-06", tenantId="tenant-001"))
    create(kube_client, backfill("elsewhere", "2024-01-20", "2024-01-21"))

    status = wait_phase(kube_api, operator, "second", "Queued", timeout=60)
    assert status["queuedBehind"] == "first"
    assert "first" in {c["type"]: c for c in status["conditions"]}["Succeeded"]["message"]
    assert not jobs_of(kube_api, "second")
    wait_phase(kube_api, operator, "elsewhere", "Succeeded", timeout=120)  # no overlap: not held back

    wait_phase(kube_api, operator, "first", "Succeeded", timeout=120)
    wait_phase(kube_api, operator, "second", "Succeeded", timeout=120)
    first_end = max(r.end for r in kubelet.runs if r.name.startswith("first-") and r.end)
    second_start = min(r.start for r in kubelet.runs if r.name.startswith("second-"))
    assert second_start >= first_end  # never wrote the same window at once


def test_killing_the_operator_mid_run_never_duplicates_or_loses_a_chunk(
    kube_api: KubeAPI, kube_client: kubernetes.client.ApiClient, kubelet: Kubelet,
    operator: OperatorProcess, analytics_db: str,
) -> None:  # fmt: skip
    create(kube_client, backfill("sturdy", "2024-01-01", "2024-01-12", parallelism=3))
    for target in (2, 6):
        kube_api.wait_for(lambda t=target: status_of(kube_api, "sturdy").get("chunks", {}).get("succeeded", 0) >= t,
                          timeout=120, interval=0.1)  # fmt: skip
        operator.kill()
        time.sleep(1.0)  # Jobs finish while nobody watches
        operator.start()
    status = wait_phase(kube_api, operator, "sturdy", "Succeeded", timeout=180)

    assert status["progress"] == "12/12"
    names = [j["metadata"]["name"] for j in jobs_of(kube_api, "sturdy")]
    assert len(names) == len(set(names))
    assert len(names) == 12  # one Job per chunk: no duplicate, none lost
    assert completed_chunks(audit_rows(analytics_db, "sturdy")) == Counter(range(12))


@pytest.mark.parametrize(
    ("name", "spec_change", "reason"),
    [
        ("reversed", {"startDate": "2024-02-01", "endDate": "2024-01-01"}, "start_date must be <= end_date"),
        ("badtenant", {"tenantId": "x' or '1'='1"}, "tenantId"),
        ("nosecret", {"databaseSecretRef": None}, "databaseSecretRef"),
    ],
)
def test_an_invalid_spec_fails_permanently_and_creates_no_job(
    kube_api: KubeAPI, kube_client: kubernetes.client.ApiClient, kubelet: Kubelet,
    operator: OperatorProcess, name: str, spec_change: dict[str, Any], reason: str,
) -> None:  # fmt: skip
    body = backfill(name, "2024-01-01", "2024-01-02")
    body["spec"].update(spec_change)
    body["spec"] = {k: v for k, v in body["spec"].items() if v is not None}
    create(kube_client, body)  # this API server runs no admission, as if CEL were off
    status = wait_phase(kube_api, operator, name, "Failed", timeout=60)
    condition = {c["type"]: c for c in status["conditions"]}["Succeeded"]
    assert condition["status"] == "False" and condition["reason"] == "InvalidSpec"
    assert reason in condition["message"]
    time.sleep(1.0)
    assert not jobs_of(kube_api, name)
