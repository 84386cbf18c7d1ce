"""DbtBackfillQueue end to end: the ceiling, priority, pause and a missing queue on a real cluster.

The same real parts as test_operator (whose fixtures these tests use): a real kube-apiserver with
the RBAC of deploy/, the real Job controller, the operator as its own process, and chunk Pods that
run the real runner and dbt against a real PostgreSQL. The ceiling is observed with a watch on the
namespace's Jobs, in the API server's own order of events, never with timings.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest

from localcluster.cluster import LocalCluster
from tests.e2e.test_operator import (
    OperatorProcess,
    assert_events,
    backfill,
    create,
    jobs_of,
    status_of,
    wait_phase,
)
from tests.support.job_census import JobCensus
from tests.support.polling import wait_established, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

GROUP, VERSION, QUEUES = "dbt-backfill.io", "v1alpha1", "dbtbackfillqueues"
QUEUE_CRD = "dbtbackfillqueues.dbt-backfill.io"


@pytest.fixture(autouse=True)
def queue_crd(cluster: LocalCluster, operator_kubeconfig: Path) -> None:
    """deploy/ installs the queue CRD (crds/kustomization.yaml); the operator needs it served."""
    with cluster.api_client() as client:
        wait_established(client, QUEUE_CRD)


def make_queue(client: kubernetes.client.ApiClient, namespace: str, name: str, **spec: Any) -> None:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "DbtBackfillQueue", "metadata": {"name": name}, "spec": spec}
    kubernetes.client.CustomObjectsApi(client).create_namespaced_custom_object(GROUP, VERSION, namespace, QUEUES, body)


def patch_queue(client: kubernetes.client.ApiClient, namespace: str, name: str, **spec: Any) -> None:
    kubernetes.client.CustomObjectsApi(client).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, QUEUES, name, {"spec": spec}, _content_type="application/merge-patch+json"
    )


def queue_of(client: kubernetes.client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = kubernetes.client.CustomObjectsApi(client).get_namespaced_custom_object(
        GROUP, VERSION, namespace, QUEUES, name
    )
    return obj


def queued_condition(status: dict[str, Any]) -> dict[str, Any]:
    return {c["type"]: c for c in status.get("conditions") or []}.get("Queued") or {}


def waiting_because(client: kubernetes.client.ApiClient, namespace: str, name: str, reason: str) -> bool:
    condition = queued_condition(status_of(client, namespace, name))
    return condition.get("status") == "True" and condition.get("reason") == reason


@pytest.fixture
def census(kube_client: kubernetes.client.ApiClient, namespace: str) -> Iterator[JobCensus]:
    watcher = JobCensus(kube_client, namespace)
    try:
        yield watcher
    finally:
        watcher.stop()


def test_two_backfills_on_a_queue_of_two_never_run_more_than_two_chunks_and_priority_goes_first(
    cluster: LocalCluster, kube_client: kubernetes.client.ApiClient, namespace: str,
    operator: OperatorProcess,
    census: JobCensus,
) -> None:  # fmt: skip
    # Paused first, so both backfills are waiting when admission starts: the priority decides,
    # not which one happened to be created first.
    make_queue(kube_client, namespace, "warehouse", maxRunningChunks=2, paused=True)
    create(kube_client, backfill(namespace, "routine", "2024-01-01", "2024-01-03", tenantId="tenant-001",
                                 parallelism=2, queueName="warehouse"))  # fmt: skip
    create(kube_client, backfill(namespace, "urgent", "2024-01-01", "2024-01-03", tenantId="tenant-002",
                                 parallelism=2, queueName="warehouse", priority=10))  # fmt: skip
    for name in ("routine", "urgent"):
        wait_for(lambda name=name: waiting_because(kube_client, namespace, name, "QueuePaused"), timeout=120,
                 message=lambda: operator.logs()[-3000:])  # fmt: skip
        assert status_of(kube_client, namespace, name)["phase"] == "Queued"
        assert_events(kube_client, namespace, name, "QueuePaused")
    assert census.created == []  # a paused queue admits nothing

    patch_queue(kube_client, namespace, "warehouse", paused=False)
    for name in ("urgent", "routine"):
        status = wait_phase(kube_client, operator, namespace, name, "Succeeded", timeout=900)
        assert status["progress"] == "3/3"
        assert queued_condition(status)["status"] == "False"
        assert status["queue"]["waiting"] == 0
    census.stop()

    assert len(census.created) == 6
    assert census.peak == 2  # the ceiling was reached, and never passed
    # Every chunk of the higher priority was admitted before any of the lower one.
    assert census.created == ["urgent"] * 3 + ["routine"] * 3
    assert_events(kube_client, namespace, "routine", "AdmittedByQueue")

    queue = wait_for(lambda: (q := queue_of(kube_client, namespace, "warehouse")).get("status", {}).get("running") == 0
                     and q, timeout=60)  # fmt: skip
    status = queue["status"]
    assert status["observedGeneration"] == queue["metadata"]["generation"]
    assert [(b["name"], b["priority"]) for b in status["backfills"]] == [("urgent", 10), ("routine", 0)]
    assert status["waiting"] == 0
    assert {c["type"]: c["status"] for c in status["conditions"]} == {"Admitting": "True"}
    table = cluster.kubectl("get", "dbfq", "warehouse", "-n", namespace).stdout.splitlines()
    assert table[0].split() == ["NAME", "RUNNING", "WAITING", "MAX", "PAUSED", "AGE"]
    assert table[1].split()[:5] == ["warehouse", "0", "0", "2", "false"]


def test_a_backfill_joining_a_busy_queue_gets_its_fair_share_from_its_first_grant(
    kube_client: kubernetes.client.ApiClient, namespace: str, operator: OperatorProcess, census: JobCensus
) -> None:
    """``first`` holds both slots of a queue of 2 and wants more; ``joiner`` (equal priority,
    younger) joins. The next slot that frees is the joiner's, and from then on neither holds both
    slots while the other still has chunks to start. The admitting pass counts the joiner's
    current demand (its declared demand, or its parallelism before its first pass), not its
    status, which is written only after the queue's lock is let go."""
    make_queue(kube_client, namespace, "shared", maxRunningChunks=2)
    totals = {"first": 6, "joiner": 3}
    create(kube_client, backfill(namespace, "first", "2024-01-01", "2024-01-06", tenantId="tenant-001",
                                 parallelism=2, queueName="shared"))  # fmt: skip
    wait_for(lambda: census.alive_by_backfill().get("first") == 2, timeout=300, message=lambda: operator.logs()[-3000:])
    before = len(census.created)
    create(kube_client, backfill(namespace, "joiner", "2024-01-01", "2024-01-03", tenantId="tenant-002",
                                 parallelism=2, queueName="shared"))  # fmt: skip
    for name in ("joiner", "first"):
        status = wait_phase(kube_client, operator, namespace, name, "Succeeded", timeout=900)
        assert status["progress"] == f"{totals[name]}/{totals[name]}"
    census.stop()

    assert census.peak == 2  # the ceiling was reached, and never passed
    assert sorted(census.created) == ["first"] * 6 + ["joiner"] * 3
    joined = census.created.index("joiner")
    # At most one Job of first after the joiner was created: a pass of first that listed the
    # backfills just before the joiner existed. Any pass that saw the joiner gave it the slot.
    assert census.created[before:joined].count("first") <= 1, census.created
    for i in range(joined, len(census.created)):
        started = Counter(census.created[: i + 1])
        alive = census.alive_at_creation[i]
        for name, other in (("first", "joiner"), ("joiner", "first")):
            if started[other] < totals[other]:  # the other still had chunks to start
                assert alive.get(name, 0) < 2, (census.created, census.alive_at_creation)


def test_a_backfill_naming_a_missing_queue_waits_until_the_queue_exists(
    kube_client: kubernetes.client.ApiClient, namespace: str,
    operator: OperatorProcess,
    census: JobCensus,
) -> None:  # fmt: skip
    create(kube_client, backfill(namespace, "early", "2024-01-05", "2024-01-05", queueName="later"))
    wait_for(lambda: waiting_because(kube_client, namespace, "early", "QueueNotFound"), timeout=120,
             message=lambda: operator.logs()[-3000:])  # fmt: skip
    status = status_of(kube_client, namespace, "early")
    assert status["phase"] == "Queued"  # waiting, not Failed: the queue may come
    assert {c["type"]: c for c in status["conditions"]}["Succeeded"]["reason"] == "QueueNotFound"
    assert_events(kube_client, namespace, "early", "QueueNotFound")
    assert not jobs_of(kube_client, namespace, "early")

    make_queue(kube_client, namespace, "later", maxRunningChunks=1)
    wait_phase(kube_client, operator, namespace, "early", "Succeeded", timeout=600)
    census.stop()
    assert census.created == ["early"]
    assert census.peak == 1


def clock(hours: float) -> str:
    return (datetime.now(UTC) + timedelta(hours=hours)).strftime("%H:%M")


def test_outside_its_allowed_windows_a_queue_admits_nothing_until_a_window_holds_now(
    kube_client: kubernetes.client.ApiClient, namespace: str,
    operator: OperatorProcess,
    census: JobCensus,
) -> None:  # fmt: skip
    # A window that opens in two hours (the test never lasts that long), and then one holding now.
    make_queue(kube_client, namespace, "nightly", maxRunningChunks=1,
               allowedWindows=[{"start": clock(2), "end": clock(3)}])  # fmt: skip
    create(kube_client, backfill(namespace, "patient", "2024-01-06", "2024-01-06", queueName="nightly"))
    wait_for(lambda: waiting_because(kube_client, namespace, "patient", "OutsideAllowedWindow"), timeout=120,
             message=lambda: operator.logs()[-3000:])  # fmt: skip
    assert_events(kube_client, namespace, "patient", "OutsideAllowedWindow")
    queue = wait_for(lambda: (q := queue_of(kube_client, namespace, "nightly")).get("status") and q, timeout=60)
    admitting = {c["type"]: c for c in queue["status"]["conditions"]}["Admitting"]
    assert (admitting["status"], admitting["reason"]) == ("False", "OutsideAllowedWindow")
    assert census.created == []

    patch_queue(kube_client, namespace, "nightly", allowedWindows=[{"start": clock(-1), "end": clock(2)}])
    wait_phase(kube_client, operator, namespace, "patient", "Succeeded", timeout=600)
    census.stop()
    assert census.created == ["patient"]
