"""One DbtBackfill for many tenants, end to end on the real control plane.

The same real parts as tests/e2e/test_operator.py (with its fixtures, from conftest.py): a real
kube-apiserver and controllers, the operator as its own process logged in with the RBAC of
``deploy/``, and each chunk Pod's real runner with real dbt against a real PostgreSQL.
"""

from __future__ import annotations

import json
from collections import Counter

import kubernetes.client
import psycopg
import pytest

from tests.e2e.test_operator import (
    OperatorProcess,
    assert_events,
    audit_rows,
    backfill,
    create,
    get_backfill,
    jobs_of,
    status_of,
    wait_phase,
)
from tests.support.polling import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

TENANTS = ["tenant-001", "tenant-002"]


def _tenant_args(job: dict[str, object]) -> tuple[str, str]:
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]  # type: ignore[index]
    return args[args.index("--tenant-id") + 1], args[args.index("--start-date") + 1]


def _create_config_map(client: kubernetes.client.ApiClient, namespace: str, name: str, text: str) -> None:
    kubernetes.client.CoreV1Api(client).create_namespaced_config_map(
        namespace, {"metadata": {"name": name}, "data": {"tenants.txt": text}}
    )


def test_two_tenants_times_two_days_run_four_jobs_each_with_its_tenant(
    kube_client: kubernetes.client.ApiClient, namespace: str, operator: OperatorProcess, analytics_db: str
) -> None:
    create(
        kube_client,
        backfill(namespace, "matrix", "2024-01-01", "2024-01-02", tenantIds=TENANTS, parallelism=2),
    )
    status = wait_phase(kube_client, operator, namespace, "matrix", "Succeeded", timeout=900)

    assert status["progress"] == "4/4"  # the Progress column counts cells
    assert status["chunks"]["total"] == 4
    assert status["succeededRanges"] == ["2024-01-01..2024-01-02"]
    assert status["tenants"]["count"] == 2
    assert status["tenantProgress"] == [
        {
            "tenants": ["tenant-001..tenant-002"],
            "count": 2,
            "succeeded": 2,
            "failed": 0,
            "succeededRanges": ["2024-01-01..2024-01-02"],
            "failedRanges": [],
        }
    ]
    jobs = jobs_of(kube_client, namespace, "matrix")
    assert len({j["metadata"]["name"] for j in jobs}) == len(jobs) == 4
    cells = sorted(_tenant_args(j) for j in jobs)
    assert cells == [(t, d) for t in TENANTS for d in ("2024-01-01", "2024-01-02")]
    for job in jobs:
        tenant, _ = _tenant_args(job)
        assert job["metadata"]["labels"]["dbt-backfill.io/tenant"] == tenant
        assert job["status"].get("succeeded") == 1

    rows = audit_rows(analytics_db, "matrix")
    chunk_rows = [r for r in rows if r["kind"] == "chunk" and r["status"] == "completed"]
    assert Counter((r["tenant_id"], r["start_date"].isoformat()) for r in chunk_rows) == Counter(
        (t, d) for t in TENANTS for d in ("2024-01-01", "2024-01-02")
    )
    assert sorted(r["chunk_index"] for r in chunk_rows) == [0, 1, 2, 3]
    parent = [r for r in rows if r["kind"] == "backfill"]
    assert len(parent) == 1 and parent[0]["status"] == "completed" and parent[0]["tenant_id"] is None
    with psycopg.connect(analytics_db) as conn:
        per_tenant = conn.execute(
            "select tenant_id, count(distinct order_date) from analytics.fact_orders"
            " where order_date between '2024-01-01' and '2024-01-02' group by tenant_id order by tenant_id"
        ).fetchall()
    assert per_tenant == [(t, 2) for t in TENANTS]


def test_tenants_from_a_config_map_wait_for_it_then_run_from_a_snapshot(
    kube_client: kubernetes.client.ApiClient, namespace: str, operator: OperatorProcess, analytics_db: str
) -> None:
    create(
        kube_client,
        backfill(
            namespace,
            "from-map",
            "2024-01-03",
            "2024-01-03",
            tenantIdsFrom={"name": "tenants", "key": "tenants.txt"},
            order="tenantMajor",
        ),
    )
    # No ConfigMap yet: a condition and a Warning Event say so, and the operator keeps trying.
    try:
        wait_for(
            lambda: any(
                c.get("reason") == "TenantListUnavailable"
                for c in status_of(kube_client, namespace, "from-map").get("conditions", [])
            ),
            timeout=120,
        )
    except TimeoutError:
        pytest.fail(f"no TenantListUnavailable condition: {status_of(kube_client, namespace, 'from-map')}")
    assert status_of(kube_client, namespace, "from-map")["phase"] == "Pending"
    assert_events(kube_client, namespace, "from-map", "TenantListUnavailable")
    assert jobs_of(kube_client, namespace, "from-map") == []

    _create_config_map(kube_client, namespace, "tenants", "# the platform's tenants\ntenant-002\n\ntenant-001\n")
    status = wait_phase(kube_client, operator, namespace, "from-map", "Succeeded", timeout=900)
    assert status["tenants"]["ids"] == ["tenant-002", "tenant-001"]
    assert status["tenants"]["source"] == "ConfigMap tenants key tenants.txt"
    assert status["progress"] == "2/2"
    rows = audit_rows(analytics_db, "from-map")
    assert sorted(r["tenant_id"] for r in rows if r["kind"] == "chunk" and r["status"] == "completed") == TENANTS
    assert sorted(_tenant_args(j)[0] for j in jobs_of(kube_client, namespace, "from-map")) == TENANTS


def test_an_invalid_tenant_id_in_the_config_map_is_invalid_spec_and_creates_no_job(
    kube_client: kubernetes.client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    _create_config_map(kube_client, namespace, "bad-tenants", "tenant-001\ntenant'; drop table orders; --\n")
    source = {"name": "bad-tenants", "key": "tenants.txt"}
    create(kube_client, backfill(namespace, "bad-map", "2024-01-01", "2024-01-02", tenantIdsFrom=source))
    status = wait_phase(kube_client, operator, namespace, "bad-map", "Failed", timeout=300)
    succeeded = {c["type"]: c for c in status["conditions"]}["Succeeded"]
    assert succeeded["reason"] == "InvalidSpec"
    assert succeeded["message"].startswith("spec.tenantIdsFrom: ConfigMap bad-tenants key tenants.txt line 2:")
    assert_events(kube_client, namespace, "bad-map", "InvalidSpec")
    assert jobs_of(kube_client, namespace, "bad-map") == []
    assert "ids" not in (status.get("tenants") or {})


def test_the_api_server_refuses_an_invalid_tenant_in_tenant_ids(
    kube_client: kubernetes.client.ApiClient, namespace: str
) -> None:
    body = backfill(namespace, "invalid", "2024-01-01", "2024-01-02", tenantIds=["tenant-001", "x' or '1'='1"])
    with pytest.raises(kubernetes.client.ApiException) as refused:
        create(kube_client, body)
    assert refused.value.status == 422
    assert "spec.tenantIds[1]" in json.loads(refused.value.body)["message"]
    both = backfill(namespace, "invalid", "2024-01-01", "2024-01-02", tenantIds=["tenant-001"], tenantId="tenant-002")
    with pytest.raises(kubernetes.client.ApiException) as refused:
        create(kube_client, both)
    assert "set at most one of tenantId, tenantIds and tenantIdsFrom" in json.loads(refused.value.body)["message"]
    assert get_backfill(kube_client, namespace, "invalid") is None


def test_a_dry_run_matrix_reports_the_eta_of_the_real_run_from_past_chunks(
    kube_client: kubernetes.client.ApiClient, namespace: str, operator: OperatorProcess, analytics_db: str
) -> None:
    models = ["stg_orders+", "stg_customers+"]
    create(kube_client, backfill(namespace, "real", "2024-01-05", "2024-01-05", tenantId="tenant-001", models=models))
    wait_phase(kube_client, operator, namespace, "real", "Succeeded", timeout=600)
    [past] = [r for r in audit_rows(analytics_db, "real") if r["kind"] == "chunk"]

    dry = {"tenantIds": TENANTS, "models": models, "dryRun": True, "parallelism": 2}
    create(kube_client, backfill(namespace, "estimate", "2024-01-06", "2024-01-07", **dry))
    status = wait_phase(kube_client, operator, namespace, "estimate", "Succeeded", timeout=600)
    estimate = status["costEstimate"]
    assert {k: estimate[k] for k in ("cells", "days", "pastChunks")} == {"cells": 4, "days": 4, "pastChunks": 1}
    # The past chunk's seconds per day, times 4 cell-days, over parallelism 2.
    assert estimate["estimatedSeconds"] == pytest.approx(past["duration_seconds"] * 4 / 2, abs=0.1)
    # Each dry-run chunk recorded the source rows its cell reads in its audit row; the status sums them.
    cells = [r for r in audit_rows(analytics_db, "estimate") if r["kind"] == "chunk"]
    assert len(cells) == 4 and all(r["dry_run"] and r["status"] == "completed" for r in cells)
    assert all(r["estimated_source_rows"] is not None for r in cells)
    assert (estimate["reportedCells"], estimate["settledCellsRead"]) == (4, 4)
    assert estimate["estimatedSourceRows"] == sum(r["estimated_source_rows"] for r in cells) > 0
    top = max(cells, key=lambda r: (r["estimated_source_rows"], -r["chunk_index"]))
    assert estimate["largestCell"] == {
        "chunk": top["chunk_index"], "window": f"{top['start_date']}..{top['end_date']}",
        "tenant": top["tenant_id"], "estimatedSourceRows": top["estimated_source_rows"],
    }  # fmt: skip
    for job in jobs_of(kube_client, namespace, "estimate"):
        assert "--dry-run" in job["spec"]["template"]["spec"]["containers"][0]["args"]
    with psycopg.connect(analytics_db) as conn:
        written = conn.execute(
            "select count(*) from analytics.fact_orders where order_date between '2024-01-06' and '2024-01-07'"
        ).fetchone()
    assert written == (0,)  # a dry run writes no data
