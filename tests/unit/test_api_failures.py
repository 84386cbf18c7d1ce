"""API errors reach the user: the API's own message, as a condition reason + message on the
backfill, and the controller forgets a launch whose Job was never created."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from kubernetes.client.exceptions import ApiException

from dbtbackfill.core.spec import parse_spec
from dbtbackfill.operator import controller, kube
from dbtbackfill.operator.reconcile import ChunkState, JobView, decide
from dbtbackfill.operator.status import FAILURE_CONDITION, api_failure_reason, summarise, with_api_failure

T0 = datetime(2024, 6, 1, 10, 0, 0, tzinfo=UTC)
INVALID = 'Job.batch "b-c0-a1" is invalid: spec.template.spec.containers[0].image: Required value'


def api_exception(code: int, reason: str, message: str | None) -> ApiException:
    exc = ApiException(status=code, reason=reason)
    if message is not None:
        exc.body = json.dumps({"kind": "Status", "status": "Failure", "message": message, "code": code})
    return exc


@pytest.mark.parametrize(
    ("code", "message", "expected"),
    [
        (422, INVALID, INVALID),
        (403, 'jobs.batch "x" is forbidden: exceeded quota: q, requested: count/jobs.batch=1', "exceeded quota"),
        (500, None, "500 Internal Server Error"),
    ],
)
def test_a_failed_call_carries_the_api_servers_message(code: int, message: str | None, expected: str) -> None:
    with pytest.raises(kube.ApiFailure) as caught, kube._calling("create", "jobs/x"):
        raise api_exception(code, "Internal Server Error" if code == 500 else "Invalid", message)
    assert expected in caught.value.message
    assert (caught.value.verb, caught.value.resource, caught.value.code) == ("create", "jobs/x", code)


def test_a_connection_error_is_an_api_failure_too() -> None:
    with pytest.raises(kube.ApiFailure) as caught, kube._calling("list", "jobs"):
        raise ConnectionRefusedError("[Errno 111] Connection refused")
    assert caught.value.code is None
    assert "Connection refused" in caught.value.message


def test_a_conflict_stays_a_conflict() -> None:
    with pytest.raises(kube.Conflict), kube._calling("create", "jobs/x"):
        raise kube.Conflict("x")


@pytest.mark.parametrize(
    ("verb", "resource", "reason"),
    [
        ("create", "jobs/b-c0-a1", "JobCreateFailed"),
        ("list", "jobs", "JobListFailed"),
        ("list", "pods", "PodListFailed"),
        ("list", "events", "EventListFailed"),
        ("delete", "jobs/b-c0-a1", "JobDeleteFailed"),
        ("patch", "dbtbackfills/b/status", "StatusPatchFailed"),
    ],
)
def test_failure_reasons_name_the_call(verb: str, resource: str, reason: str) -> None:
    assert api_failure_reason(verb, resource) == reason


def running_status() -> dict[str, object]:
    spec = parse_spec({"startDate": "2024-01-01", "endDate": "2024-01-02", "databaseSecretRef": {"name": "db"}})
    return summarise(
        windows=spec.windows(),
        state=ChunkState(),
        phase="Pending",
        running=frozenset(),
        parallelism=1,
        generation=1,
        previous={},
        now=T0,
    )


def conditions(status: dict[str, object]) -> dict[str, dict[str, object]]:
    return {str(c["type"]): c for c in status["conditions"]}  # type: ignore[attr-defined]


def test_a_failure_sets_the_condition_and_the_succeeded_reason_and_keeps_the_phase() -> None:
    base = running_status()
    failed = with_api_failure(
        base, {}, ("JobCreateFailed", INVALID), failures=2, retry_at=T0 + timedelta(seconds=10), generation=1, now=T0
    )
    cond = conditions(failed)
    assert cond[FAILURE_CONDITION]["status"] == "True"
    assert (cond[FAILURE_CONDITION]["reason"], cond[FAILURE_CONDITION]["message"]) == ("JobCreateFailed", INVALID)
    assert (cond["Succeeded"]["status"], cond["Succeeded"]["reason"]) == ("Unknown", "JobCreateFailed")
    assert failed["phase"] == "Pending"
    assert (failed["apiFailures"], failed["apiRetryAt"]) == (2, "2024-06-01T10:00:10Z")

    recovered = with_api_failure(base, failed, None, failures=0, retry_at=None, generation=1, now=T0)
    cond = conditions(recovered)
    assert (cond[FAILURE_CONDITION]["status"], cond[FAILURE_CONDITION]["reason"]) == ("False", "Recovered")
    assert cond["Succeeded"]["reason"] == "InProgress"
    assert (recovered["apiFailures"], recovered["apiRetryAt"]) == (None, None)


def test_a_backfill_that_never_failed_carries_no_failure_condition() -> None:
    status = with_api_failure(running_status(), {}, None, failures=0, retry_at=None, generation=1, now=T0)
    assert FAILURE_CONDITION not in conditions(status)


def test_a_launch_whose_create_failed_is_forgotten_and_stays_due() -> None:
    spec = parse_spec(
        {
            "startDate": "2024-01-01",
            "endDate": "2024-01-03",
            "databaseSecretRef": {"name": "db"},
            "parallelism": 3,
            "retry": {"limit": 2, "backoffSeconds": 10},
        }
    )
    state = ChunkState(attempts={1: 1}, retry_at={1: T0})  # chunk 1 failed once and is due now
    decision = decide(spec, spec.windows(), state, [], T0)
    assert [(i.window.index, i.attempt) for i in decision.launch] == [(0, 1), (1, 2), (2, 1)]
    kept = controller._unlaunch(decision, decision.launch[1:], T0)
    assert [(i.window.index, i.attempt) for i in kept.launch] == [(0, 1)]
    assert dict(kept.state.attempts) == {0: 1, 1: 1}
    assert kept.state.retry_at == {1: T0}
    assert kept.state.tries(1) == 1  # nothing charged for the failed create
    created = JobView(name="b-c0-a1", chunk=0, attempt=1, phase="active", created=T0)
    again = decide(spec, spec.windows(), kept.state, [created], T0 + timedelta(seconds=20))
    assert [(i.window.index, i.attempt) for i in again.launch] == [(1, 2), (2, 1)]
