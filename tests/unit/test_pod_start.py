"""Why a chunk's Pod never started, from Pod and Event objects shaped as the API returns them."""

from __future__ import annotations

from typing import Any

import pytest

from dbtbackfill.operator.pod_start import failed_create, pod_alive, pod_problem, pod_started, report


def pod(phase: str = "Pending", *, waiting: dict[str, str] | None = None, **status: Any) -> dict[str, Any]:
    statuses = []
    if waiting is not None:
        statuses = [{"name": "dbt", "ready": False, "state": {"waiting": waiting}}]
    return {"metadata": {"name": "p"}, "status": {"phase": phase, "containerStatuses": statuses, **status}}


MISSING_KEY = {"reason": "CreateContainerConfigError", "message": "couldn't find key DATABASE_URL in Secret ns/db"}


@pytest.mark.parametrize(
    ("waiting", "expected"),
    [
        (MISSING_KEY, "CreateContainerConfigError: couldn't find key DATABASE_URL in Secret ns/db"),
        ({"reason": "CreateContainerConfigError", "message": 'secret "db" not found'}, 'secret "db" not found'),
        ({"reason": "ErrImageNeverPull", "message": 'Container image "x:1" is not present'}, "ErrImageNeverPull"),
        ({"reason": "ImagePullBackOff", "message": 'Back-off pulling image "x"'}, "ImagePullBackOff: Back-off"),
        ({"reason": "ErrImagePull"}, "ErrImagePull"),
    ],
)
def test_a_waiting_container_tells_why(waiting: dict[str, str], expected: str) -> None:
    problem = pod_problem(pod(waiting=waiting))
    assert problem is not None and expected in problem
    assert not pod_started(pod(waiting=waiting))


def test_creating_a_container_is_progress_not_a_problem() -> None:
    assert pod_problem(pod(waiting={"reason": "ContainerCreating"})) is None


def test_an_unschedulable_pod_tells_why() -> None:
    unschedulable = pod(
        conditions=[
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/1 nodes are available"}
        ]
    )
    assert pod_problem(unschedulable) == "Unschedulable: 0/1 nodes are available"


def test_a_job_without_pods_reports_the_latest_failed_create_event() -> None:
    events = [
        {"reason": "FailedCreate", "message": "old", "lastTimestamp": "2024-06-01T10:00:00Z"},
        {"reason": "SuccessfulCreate", "message": "x", "lastTimestamp": "2024-06-01T10:00:05Z"},
        {
            "reason": "FailedCreate",
            "message": 'Error creating: pods "a" is forbidden: serviceaccount "dbt-backfill-job" not found',
            "lastTimestamp": "2024-06-01T10:00:09Z",
        },
    ]
    assert failed_create(events) == (
        'FailedCreate: Error creating: pods "a" is forbidden: serviceaccount "dbt-backfill-job" not found'
    )
    seen = report([], events)
    assert (seen.started, seen.alive) == (False, False)
    assert seen.problem is not None and "serviceaccount" in seen.problem


def test_a_pod_problem_wins_over_an_older_failed_create() -> None:
    seen = report([pod(waiting=MISSING_KEY)], [{"reason": "FailedCreate", "message": "quota"}])
    assert seen.problem is not None and seen.problem.startswith("CreateContainerConfigError")


@pytest.mark.parametrize(
    ("obj", "started", "alive"),
    [
        (pod("Pending"), False, True),
        (pod("Running"), True, True),
        (pod("Succeeded"), True, False),
        (pod("Failed"), False, False),  # failed before any container ran (e.g. evicted)
        (
            {"status": {"phase": "Failed", "containerStatuses": [{"state": {"terminated": {"exitCode": 1}}}]}},
            True,
            False,
        ),
        ({"metadata": {"deletionTimestamp": "2024-06-01T10:00:00Z"}, "status": {"phase": "Running"}}, True, True),
    ],
)
def test_started_and_alive(obj: dict[str, Any], started: bool, alive: bool) -> None:
    assert (pod_started(obj), pod_alive(obj)) == (started, alive)


def test_a_report_is_alive_while_any_pod_is() -> None:
    assert report([pod("Failed"), pod("Running")]).alive
    assert not report([pod("Failed"), pod("Succeeded")]).alive
    assert report([]) == report([], [])
