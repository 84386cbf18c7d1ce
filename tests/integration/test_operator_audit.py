"""The operator's audit writes: retried until they land when the database is down, never duplicated.

Real PostgreSQL; the "down" database is a closed loopback port, which is what an outage looks
like to the client.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest

from dbtbackfill.core import audit
from dbtbackfill.core.spec import parse_spec
from dbtbackfill.operator import controller, jobs

pytestmark = pytest.mark.integration

OWNER = jobs.Owner(name="nightly", namespace="analytics", uid=str(uuid.UUID(int=7)))
SPEC = parse_spec({"startDate": "2024-01-01", "endDate": "2024-01-31", "databaseSecretRef": {"name": "db"}})
UNREACHABLE = "postgresql://postgres@127.0.0.1:1/nowhere"


@pytest.fixture(autouse=True)
def _dispose_engines() -> Iterator[None]:
    yield
    audit.dispose_engines()


def rows(url: str) -> list[tuple[str, str, float | None]]:
    with psycopg.connect(url) as conn:
        return [
            (r[0], r[1], r[2])
            for r in conn.execute(
                "select kind, status, duration_seconds from backfill_executions where backfill_uid = %s", (OWNER.uid,)
            )
        ]


def test_audit_writes_wait_for_the_database_and_land_once(database_url: str) -> None:
    running = {"phase": "Running", "startTime": "2024-02-01T00:00:00Z"}
    down, up = controller.AuditLog(UNREACHABLE), controller.AuditLog(database_url)

    record = controller._audit({}, OWNER, SPEC, "Running", running, down)
    assert record["started"] is False
    assert controller._audit_pending({**running, "audit": record})

    record = controller._audit(record, OWNER, SPEC, "Running", running, up)
    assert record["started"] is True and not controller._audit_pending({**running, "audit": record})
    assert rows(database_url) == [("backfill", "running", None)]

    done = {"phase": "Succeeded", "startTime": "2024-02-01T00:00:00Z", "completionTime": "2024-02-01T00:10:00Z"}
    record = controller._audit(record, OWNER, SPEC, "Succeeded", done, down)
    assert record["closed"] is None and controller._audit_pending({**done, "audit": record})
    record = controller._audit(record, OWNER, SPEC, "Succeeded", done, up)
    assert record["closed"] == "completed"
    # Replaying the whole sequence (an operator restarted from an older status) adds nothing.
    controller._audit({}, OWNER, SPEC, "Running", running, up)
    controller._audit({"started": True}, OWNER, SPEC, "Succeeded", done, up)
    assert rows(database_url) == [("backfill", "completed", 600.0)]


def test_cancelling_marks_the_row_cancelled(database_url: str) -> None:
    up = controller.AuditLog(database_url)
    assert up.start(OWNER, SPEC)
    assert up.finish(OWNER, "cancelled", 12.0, "deleted")
    assert rows(database_url) == [("backfill", "cancelled", 12.0)]
    assert not controller.AuditLog(UNREACHABLE).finish(OWNER, "cancelled", 1.0, "deleted")
