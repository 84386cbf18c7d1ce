"""A chunk Job as the real Job controller reports it: when its Pods may still be alive, and
where its runner writes the audit row."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from dbtbackfill.operator.jobs import AUDIT_URL_ENV, JobDefaults, build_job, job_view
from tests.unit.test_jobs import DEFAULTS, OWNER, api_job, make_spec, window

FAILED = {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "limit"}
TARGET = {"type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded", "message": "target"}
COMPLETE = {"type": "Complete", "status": "True"}


@pytest.mark.parametrize(
    ("status", "phase", "alive"),
    [
        ({}, "active", True),  # no Pod yet: one may appear any moment
        ({"active": 1}, "active", True),
        # FailureTarget comes first; Failed only once no Pod is terminating (since 1.31).
        ({"failed": 1, "terminating": 1, "conditions": [TARGET]}, "failed", True),
        ({"failed": 1, "conditions": [TARGET]}, "failed", True),
        ({"failed": 1, "terminating": 0, "conditions": [TARGET, FAILED]}, "failed", False),
        ({"failed": 1}, "failed", True),  # counted failed, not settled: the Pod may be being deleted
        ({"succeeded": 1, "conditions": [COMPLETE]}, "succeeded", False),
        ({"succeeded": 1, "terminating": 1, "conditions": [COMPLETE]}, "succeeded", True),
    ],
)
def test_a_job_is_alive_until_its_terminal_condition_and_no_pod_terminating(
    status: dict[str, Any], phase: str, alive: bool
) -> None:
    view = job_view(api_job(**status))
    assert view is not None
    assert (view.phase, view.alive) == (phase, alive)


def test_failure_target_alone_already_fails_the_attempt_with_its_message() -> None:
    view = job_view(api_job(failed=0, conditions=[TARGET]))
    assert view is not None
    assert (view.phase, view.message) == ("failed", "target")


def test_job_view_carries_the_creation_time_for_the_start_deadline() -> None:
    view = job_view(api_job())
    assert view is not None
    assert view.created == datetime(2024, 6, 1, 9, 59, 58, tzinfo=UTC)


def env_of(defaults: JobDefaults) -> dict[str, Any]:
    spec = make_spec()
    container = build_job(OWNER, spec, window(spec, 0), 1, defaults)["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e for e in container["env"]}


def test_a_separate_audit_database_reaches_the_chunk_from_a_secret() -> None:
    env = env_of(JobDefaults(image="x", audit_secret_name="dbt-backfill-audit-db", audit_secret_key="URL"))
    assert env[AUDIT_URL_ENV] == {
        "name": AUDIT_URL_ENV,
        "valueFrom": {"secretKeyRef": {"name": "dbt-backfill-audit-db", "key": "URL"}},
    }
    assert "secretKeyRef" in env["DATABASE_URL"]["valueFrom"]


def test_without_an_audit_secret_the_chunk_audits_into_its_warehouse() -> None:
    assert AUDIT_URL_ENV not in env_of(DEFAULTS)
