"""Chunk records and errors reach the backfill's status with the audit log in the warehouse and
in a database of its own (deploy/'s layout).

Real PostgreSQL and real dbt: a chunk runs the exact command and environment its Job gets
(``jobs.build_job``), in-process; the operator's side reads the audit database it is configured
with, as ``controller`` does on every pass.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from dbtbackfill.core import audit
from dbtbackfill.core.spec import parse_spec
from dbtbackfill.operator import controller, jobs, reconcile, status
from dbtbackfill.operator.reconcile import ChunkState, JobView
from tests.conftest import create_database
from tests.integration.conftest import audit_rows, load_demo, register_url, run_cli, table_exists

pytestmark = pytest.mark.integration

OWNER = jobs.Owner(name="layouts", namespace="analytics", uid=str(uuid.UUID(int=11)))
SPEC = parse_spec(
    {
        "startDate": "2024-02-01",
        "endDate": "2024-02-02",
        "databaseSecretRef": {"name": "warehouse"},
        "retry": {"limit": 0},
        "allowRecent": True,
    }
)
NOW = datetime(2024, 6, 1, 10, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _isolated(fresh_env: None, dispose_engines: None) -> None:
    """Clean env (no DATABASE_URL), private dbt target dir, engines disposed after."""


@pytest.fixture(params=["same-database", "separate-database"])
def layout(request: pytest.FixtureRequest, database_url: str, pg_server: Any) -> tuple[str, str]:
    """(warehouse URL, audit URL)."""
    warehouse = load_demo(database_url)
    if request.param == "same-database":
        return warehouse, warehouse
    return warehouse, register_url(create_database(pg_server, f"audit_{uuid.uuid4().hex[:8]}"))


def defaults_for(warehouse: str, audit_url: str) -> jobs.JobDefaults:
    """The operator's Job settings: an audit Secret only when the audit log has its own database."""
    secret = "dbt-backfill-audit-db" if audit_url != warehouse else None
    return jobs.JobDefaults(image="dbt-backfill-operator:test", audit_secret_name=secret)


def run_chunk_as_its_job(chunk: int, warehouse: str, audit_url: str, monkeypatch: pytest.MonkeyPatch) -> int:
    """Run the chunk's container command with the env its Job resolves from the Secrets."""
    manifest = jobs.build_job(OWNER, SPEC, SPEC.windows()[chunk], 1, defaults_for(warehouse, audit_url))
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    secrets = {"warehouse": warehouse, "dbt-backfill-audit-db": audit_url}
    monkeypatch.delenv(jobs.AUDIT_URL_ENV, raising=False)
    for item in container["env"]:
        ref = (item.get("valueFrom") or {}).get("secretKeyRef")
        if ref:
            monkeypatch.setenv(item["name"], secrets[ref["name"]])  # what the kubelet injects
    args = container["args"]
    assert args[:3] == ["python", "-m", "scripts.run_dbt_backfill"]
    return run_cli(*args[3:])


def test_records_and_errors_reach_the_status_in_either_layout(
    layout: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    warehouse, audit_url = layout
    assert run_chunk_as_its_job(0, warehouse, audit_url, monkeypatch) == 0
    chunk_row = next(r for r in audit_rows(audit_url) if r["kind"] == "chunk")
    assert chunk_row["id"] == jobs.chunk_execution_id(OWNER, 0, 1)
    assert chunk_row["records_processed"] > 0
    if audit_url != warehouse:
        assert not table_exists(warehouse, "public", "backfill_executions"), "nothing audited into the warehouse"

    # Chunk 1 failed; its row (written as the runner writes it) holds dbt's error.
    failed_id = jobs.chunk_execution_id(OWNER, 1, 1)
    engine = audit.engine_for(audit_url)
    window = SPEC.windows()[1]
    audit.record_start(
        engine,
        audit.ExecutionStart(
            id=failed_id,
            start_date=window.start,
            end_date=window.end,
            kind="chunk",
            parent_id=jobs.backfill_execution_id(OWNER),
        ),
    )
    audit.record_finish(
        engine,
        failed_id,
        "failed",
        duration_seconds=1.0,
        records_processed=None,
        error_message='relation "raw.orders" does not exist',
    )

    auditlog = controller.AuditLog(audit_url)  # the operator's DATABASE_URL
    views = [
        JobView(name=jobs.job_name(OWNER, 0, 1), chunk=0, attempt=1, phase="succeeded"),
        JobView(name=jobs.job_name(OWNER, 1, 1), chunk=1, attempt=1, phase="failed", message="BackoffLimitExceeded"),
    ]
    state = ChunkState(attempts={0: 1, 1: 1})
    observed = controller._with_audit(
        controller.Observed(views, frozenset()), OWNER, SPEC, SPEC.windows(), state, auditlog
    )
    decision = reconcile.decide(SPEC, SPEC.windows(), state, observed.views, NOW)
    new = status.summarise(
        windows=SPEC.windows(),
        state=decision.state,
        phase=decision.phase,
        running=decision.running,
        parallelism=1,
        generation=1,
        previous={},
        now=NOW,
    )
    assert new["recordsProcessed"] == chunk_row["records_processed"]
    assert new["recentFailures"][0]["message"] == 'relation "raw.orders" does not exist'
    assert decision.phase == "Failed"


def test_a_succeeded_chunk_whose_job_vanished_is_never_run_again(
    layout: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    warehouse, audit_url = layout
    assert run_chunk_as_its_job(0, warehouse, audit_url, monkeypatch) == 0
    # Its Job finished and its TTL deleted it while the operator was down: no Job is listed.
    state = ChunkState(attempts={0: 1, 1: 1}, succeeded=frozenset())
    observed = controller._with_audit(
        controller.Observed([], frozenset()), OWNER, SPEC, SPEC.windows(), state, controller.AuditLog(audit_url)
    )
    decision = reconcile.decide(SPEC, SPEC.windows(), state, observed.views, NOW)
    assert decision.state.succeeded == frozenset({0})
    assert decision.state.records > 0
    assert [i.window.index for i in decision.launch] == []  # chunk 1 had no row: charged, limit 0
    assert decision.state.failed == frozenset({1})


def test_an_unreadable_audit_database_holds_a_vanished_chunk() -> None:
    state = ChunkState(attempts={0: 1})
    down = controller.AuditLog("postgresql://postgres@127.0.0.1:1/nowhere")
    observed = controller._with_audit(controller.Observed([], frozenset()), OWNER, SPEC, SPEC.windows(), state, down)
    assert observed.audit_unreadable and observed.busy == frozenset({0})
    decision = reconcile.decide(SPEC, SPEC.windows(), state, observed.views, NOW, busy=observed.busy)
    assert [i.window.index for i in decision.launch] == [1]  # chunk 0 waits for the audit database
    assert decision.state.succeeded == frozenset() and decision.state.failed == frozenset()


def test_the_operator_writes_the_chunk_row_of_an_attempt_that_never_started(database_url: str) -> None:
    auditlog = controller.AuditLog(register_url(database_url))
    message = "no Pod started within startDeadlineSeconds=60: CreateContainerConfigError: couldn't find key X"
    auditlog.unstarted(OWNER, SPEC, SPEC.windows()[1], 2, message)
    [row] = audit_rows(database_url)
    assert row["id"] == jobs.chunk_execution_id(OWNER, 1, 2)
    assert (row["kind"], row["status"], row["error_message"]) == ("chunk", "failed", message)
    assert (row["chunk_index"], row["attempt"], row["parent_id"]) == (1, 2, jobs.backfill_execution_id(OWNER))


def test_the_unstarted_row_of_a_matrix_cell_carries_its_tenant(database_url: str) -> None:
    auditlog = controller.AuditLog(register_url(database_url))
    matrix = replace(SPEC, tenant_id=None, tenant_ids=("acme", "globex"))
    cell = matrix.cells()[3]  # window-major: the second window of globex
    auditlog.unstarted(OWNER, matrix, cell, 1, "no Pod started")
    [row] = audit_rows(database_url)
    assert (row["tenant_id"], row["chunk_index"], row["start_date"]) == ("globex", 3, cell.start)
