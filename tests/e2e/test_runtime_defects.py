"""Runtime defects only a real control plane shows, each against the operator as it ships.

The real kube-apiserver, kube-controller-manager (Job, TTL, garbage-collector, quota controllers)
and scheduler, with the node agent running each Pod's container as a host process. The operator
runs as its own process with its ServiceAccount's token, so deploy/'s RBAC applies. Chunk
"images" are host-image configs (`LocalCluster.define_image`): a shell entrypoint stands in for
dbt where the test is about Pods, and the real runner (`python -m scripts.run_dbt_backfill`, real
dbt, real PostgreSQL) runs where the audit row matters.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import kubernetes.client
import psycopg
import pytest

from dbtbackfill.demo.data import load_demo_data
from localcluster.cluster import LocalCluster
from tests.e2e.conftest import OPERATOR_USER, assert_no_request_was_forbidden
from tests.support.operator_process import SHORT_WATCHES, OperatorProcess
from tests.support.polling import wait_for

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
GROUP, VERSION, PLURAL = "dbt-backfill.io", "v1alpha1", "dbtbackfills"
JSON = dict[str, Any]


def raw(call: Any, *args: Any, **kwargs: Any) -> JSON:
    return dict(json.loads(call(*args, _preload_content=False, **kwargs).data))


def core(client: kubernetes.client.ApiClient) -> Any:
    return kubernetes.client.CoreV1Api(client)


def custom(client: kubernetes.client.ApiClient) -> Any:
    return kubernetes.client.CustomObjectsApi(client)


@pytest.fixture
def ready_namespace(namespace: str, kube_client: kubernetes.client.ApiClient) -> str:
    """A backfill namespace prepared as docs/operations.md says: the chunk ServiceAccount exists."""
    core(kube_client).create_namespaced_service_account(namespace, {"metadata": {"name": "dbt-backfill-job"}})
    return namespace


@pytest.fixture
def start_operator(
    cluster: LocalCluster,
    kube_client: kubernetes.client.ApiClient,
    operator_kubeconfig: Path,
    ready_namespace: str,
    database_url: str,
    tmp_path: Path,
) -> Iterator[Any]:
    """Start ``dbt-backfill operator --namespace NS`` (audit log in this test's database); on
    teardown, delete the backfills while it runs so its finalizer lets them go, as test_operator does."""
    started: list[OperatorProcess] = []

    def start(image: str, unsettled_kept: int | None = None) -> OperatorProcess:
        proc = OperatorProcess(
            operator_kubeconfig, database_url, image, tmp_path, ["--namespace", ready_namespace], env=SHORT_WATCHES
        )
        proc.env["DBT_BACKFILL_WATCH_TIMEOUT_SECONDS"] = "3"  # watches end (and are audited) often
        if unsettled_kept is not None:
            proc.env["DBT_BACKFILL_UNSETTLED_JOBS"] = str(unsettled_kept)
        proc.start()
        started.append(proc)
        return proc

    try:
        yield start
        live = [p for p in started if p.process is not None and p.process.poll() is None]
        if live:
            custom(kube_client).delete_collection_namespaced_custom_object(GROUP, VERSION, ready_namespace, PLURAL)
            wait_for(
                lambda: (
                    not custom(kube_client).list_namespaced_custom_object(GROUP, VERSION, ready_namespace, PLURAL)[
                        "items"
                    ]
                ),
                timeout=60,
                message=lambda: live[0].logs()[-3000:],
            )
    finally:
        for proc in started:
            proc.stop()
    assert_no_request_was_forbidden(cluster)


@pytest.fixture
def project_outside_tmp() -> Iterator[Path]:
    """A directory for the dbt project that is not under /tmp: the node agent maps the Pod's /tmp
    (an emptyDir) to the Pod's own directory, which would hide a project kept there."""
    path = Path(tempfile.mkdtemp(prefix="dbt-backfill-e2e-", dir="/var/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def shell_image(cluster: LocalCluster, script: str) -> str:
    """A host image whose entrypoint is ``sh -c SCRIPT``; the operator's args follow as ``$@``."""
    name = f"sh-{uuid.uuid4().hex[:8]}:1"
    cluster.define_image(name, entrypoint=["sh", "-c", script, "chunk"])
    return name


def backfill(name: str, **spec: Any) -> JSON:
    body = {
        "startDate": "2024-01-01",
        "endDate": "2024-01-01",
        "databaseSecretRef": {"name": "warehouse"},
        "retry": {"limit": 1, "backoffSeconds": 1},
        **spec,
    }
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "DbtBackfill", "metadata": {"name": name}, "spec": body}


def create_backfill(client: kubernetes.client.ApiClient, namespace: str, body: JSON) -> None:
    custom(client).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)


def status_of(client: kubernetes.client.ApiClient, namespace: str, name: str) -> JSON:
    obj = custom(client).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    return dict(obj.get("status") or {})


def conditions(status: JSON) -> dict[str, JSON]:
    return {c["type"]: c for c in status.get("conditions") or []}


def wait_phase(
    client: kubernetes.client.ApiClient,
    namespace: str,
    name: str,
    phase: str,
    operator: OperatorProcess,
    timeout: float = 120,
) -> JSON:
    def reached() -> JSON | None:
        status = status_of(client, namespace, name)
        return status if status.get("phase") == phase else None

    return wait_for(
        reached,
        timeout=timeout,
        interval=0.5,
        message=lambda: f"{name} not {phase}: {status_of(client, namespace, name)}\n{operator.logs()[-3000:]}",
    )


def warnings(client: kubernetes.client.ApiClient, namespace: str, name: str, reason: str) -> list[JSON]:
    selector = f"involvedObject.name={name},involvedObject.kind=DbtBackfill"
    items = raw(core(client).list_namespaced_event, namespace, field_selector=selector)["items"]
    return [e for e in items if e.get("reason") == reason and e.get("type") == "Warning"]


def secret(client: kubernetes.client.ApiClient, namespace: str, name: str, data: dict[str, str]) -> None:
    # Labelled as the operator's policy requires of a Secret a backfill names (README, Security notes).
    metadata = {"name": name, "labels": {"dbt-backfill.io/warehouse": "true"}}
    core(client).create_namespaced_secret(namespace, {"metadata": metadata, "stringData": data})


def chunk_rows(url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "select chunk_index, attempt, status, records_processed, error_message from backfill_executions"
            " where kind = 'chunk' order by chunk_index, attempt"
        ).fetchall()


def pod_logs(cluster: LocalCluster, namespace: str) -> str:
    logs = sorted(cluster.node_state_dir.glob(f"pods/{namespace}_*/*/*.log"))
    return "\n".join(f"{path}:\n{path.read_text(errors='replace')[-3000:]}" for path in logs)


# ----------------------------------------------------------------------------- API errors


class AdmissionPolicy:
    """A ValidatingAdmissionPolicy (and its binding) that refuses every Job created in one namespace."""

    def __init__(self, client: kubernetes.client.ApiClient, name: str) -> None:
        self.api: Any = kubernetes.client.AdmissionregistrationV1Api(client)
        self.name = name

    def remove(self) -> None:
        for delete in (
            self.api.delete_validating_admission_policy_binding,
            self.api.delete_validating_admission_policy,
        ):
            with contextlib.suppress(kubernetes.client.ApiException):
                delete(self.name)


@pytest.fixture
def admission_policy(kube_client: kubernetes.client.ApiClient) -> Iterator[Any]:
    made: list[AdmissionPolicy] = []

    def make(
        client: kubernetes.client.ApiClient,
        namespace: str,
        *,
        message: str,
        operation: str = "CREATE",
        expression: str = "has(object.metadata.labels) && 'team' in object.metadata.labels",
    ) -> AdmissionPolicy:
        policy = AdmissionPolicy(client, f"refuse-jobs-{operation.lower()}-{namespace}"[:63])
        rules = [{"apiGroups": ["batch"], "apiVersions": ["v1"], "operations": [operation], "resources": ["jobs"]}]
        policy.api.create_validating_admission_policy(
            {
                "metadata": {"name": policy.name},
                "spec": {
                    "failurePolicy": "Fail",
                    "matchConstraints": {"resourceRules": rules},
                    "validations": [{"expression": expression, "message": message, "reason": "Invalid"}],
                },
            }
        )
        selector = {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
        policy.api.create_validating_admission_policy_binding(
            {
                "metadata": {"name": policy.name},
                "spec": {
                    "policyName": policy.name,
                    "validationActions": ["Deny"],
                    "matchResources": {"namespaceSelector": selector},
                },
            }
        )
        made.append(policy)
        # The API server loads policies asynchronously: wait until a Job is actually refused.
        container = {"name": "c", "image": "host", "command": ["true"]}
        probe: JSON = {
            "metadata": {"generateName": "probe-"},
            "spec": {"suspend": True, "template": {"spec": {"restartPolicy": "Never", "containers": [container]}}},
        }
        batch: Any = kubernetes.client.BatchV1Api(client)
        if operation == "UPDATE":  # a suspended Job (no Pod) to try the update on
            probe = raw(batch.create_namespaced_job, namespace, probe)

        def refused() -> bool:
            try:
                if operation == "UPDATE":
                    patch = {"metadata": {"labels": {"dbt-backfill.io/settled": "true"}}}
                    batch.patch_namespaced_job(probe["metadata"]["name"], namespace, patch, dry_run="All")
                else:
                    batch.create_namespaced_job(namespace, probe, dry_run="All")
            except kubernetes.client.ApiException as e:
                return bool(e.status == 422)
            return False

        wait_for(refused, timeout=30, message="the admission policy never took effect")
        if operation == "UPDATE":
            batch.delete_namespaced_job(probe["metadata"]["name"], namespace)
        return policy

    yield make
    for policy in made:
        policy.remove()


def test_a_job_create_the_api_refuses_shows_as_a_condition_and_a_warning_event(
    cluster: LocalCluster,
    kube_client: kubernetes.client.ApiClient,
    ready_namespace: str,
    start_operator: Any,
    admission_policy: Any,
) -> None:
    ns = ready_namespace
    # An organisation's admission policy the CRD cannot know about: the API answers 422 Invalid.
    policy = admission_policy(kube_client, ns, message="Jobs here need a team label")
    secret(kube_client, ns, "warehouse", {"DATABASE_URL": "postgresql://unused@127.0.0.1:1/x"})
    operator = start_operator(shell_image(cluster, "exit 0"))
    create_backfill(kube_client, ns, backfill("refused"))

    def failing() -> JSON | None:
        cond = conditions(status_of(kube_client, ns, "refused")).get("ReconcileFailure")
        return cond if cond and cond["status"] == "True" else None

    cond = wait_for(failing, timeout=60, interval=0.5, message=lambda: operator.logs()[-3000:])
    assert cond["reason"] == "JobCreateFailed"
    assert "Jobs here need a team label" in cond["message"]
    status = status_of(kube_client, ns, "refused")
    assert status["phase"] in ("Pending", "Running")
    assert conditions(status)["Succeeded"]["status"] == "Unknown"
    assert conditions(status)["Succeeded"]["reason"] == "JobCreateFailed"
    assert status["apiFailures"] >= 1 and status["apiRetryAt"]  # the backoff, kept by the API server
    events = wait_for(lambda: warnings(kube_client, ns, "refused", "JobCreateFailed"), timeout=30)
    assert "Jobs here need a team label" in events[0]["message"]

    # The cause goes away: the retry (after its backoff) creates the Job and the backfill ends.
    policy.remove()
    done = wait_phase(kube_client, ns, "refused", "Succeeded", operator)
    recovered = conditions(done)["ReconcileFailure"]
    assert (recovered["status"], recovered["reason"]) == ("False", "Recovered")


def test_the_job_watch_is_label_selected_by_the_api_server(
    cluster: LocalCluster, kube_client: kubernetes.client.ApiClient, ready_namespace: str, start_operator: Any
) -> None:
    ns = ready_namespace
    secret(kube_client, ns, "warehouse", {"DATABASE_URL": "postgresql://unused@127.0.0.1:1/x"})
    operator = start_operator(shell_image(cluster, "exit 0"))
    create_backfill(kube_client, ns, backfill("watched"))
    wait_phase(kube_client, ns, "watched", "Succeeded", operator)

    def job_reads(verb: str) -> list[JSON]:
        events = cluster.audit_events(username=OPERATOR_USER, verbs=[verb], namespace=ns)
        return [e for e in events if (e.get("objectRef") or {}).get("resource") == "jobs"]

    # A watch is logged once it ends; the operator's end every 3 s (server timeout).
    watches = wait_for(lambda: job_reads("watch"), timeout=30, message="no completed Job watch in the audit log")
    for event in [*watches, *job_reads("list")]:
        # kopf's watch selects on the label's presence; the reconciler's list on one backfill's uid.
        [selector] = parse_qs(urlsplit(event["requestURI"]).query).get("labelSelector") or [""]
        assert selector.startswith("dbt-backfill.io/backfill-uid"), event["requestURI"]


# ----------------------------------------------------------------------------- never started


def test_a_chunk_whose_secret_key_is_missing_fails_after_the_start_deadline_with_the_reason(
    cluster: LocalCluster,
    kube_client: kubernetes.client.ApiClient,
    ready_namespace: str,
    start_operator: Any,
    database_url: str,
) -> None:
    ns = ready_namespace
    secret(kube_client, ns, "warehouse", {"DATABASE_URL": "postgresql://unused@127.0.0.1:1/x"})
    operator = start_operator(shell_image(cluster, "exit 0"))
    create_backfill(
        kube_client,
        ns,
        backfill("nokey", databaseSecretRef={"name": "warehouse", "key": "NOPE"}, startDeadlineSeconds=3),
    )
    status = wait_phase(kube_client, ns, "nokey", "Failed", operator, timeout=120)
    messages = [f["message"] for f in status["recentFailures"]]
    assert len(messages) == 2  # the first attempt and its one retry
    for message in messages:
        assert "CreateContainerConfigError" in message and "NOPE" in message, message
        assert "startDeadlineSeconds=3" in message
    assert "CreateContainerConfigError" in conditions(status)["Succeeded"]["message"]
    assert wait_for(lambda: warnings(kube_client, ns, "nokey", "ChunkRetry"), timeout=30)
    failed = wait_for(lambda: warnings(kube_client, ns, "nokey", "ChunkFailed"), timeout=30)
    assert "CreateContainerConfigError" in failed[0]["message"]
    rows = chunk_rows(database_url)
    assert [(r[0], r[1], r[2]) for r in rows] == [(0, 1, "failed"), (0, 2, "failed")]
    assert all("CreateContainerConfigError" in r[4] for r in rows)


# ----------------------------------------------------------------------------- no overlap


def test_a_retry_never_starts_while_the_previous_attempts_pod_is_terminating(
    cluster: LocalCluster, kube_client: kubernetes.client.ApiClient, ready_namespace: str, start_operator: Any,
    tmp_path: Path,
) -> None:  # fmt: skip
    ns = ready_namespace
    trace = tmp_path / "attempts.log"
    # The chunk's "dbt" traps SIGTERM and keeps writing for a few seconds, as a real one finishing
    # its transaction would; activeDeadlineSeconds makes the Job controller delete its Pod.
    script = (
        f'echo "start $$" >> {trace}; '
        f"trap 'sleep 5; echo \"end $$\" >> {trace}; kill $child; exit 1' TERM; "
        "sleep 600 & child=$!; wait $child"
    )
    secret(kube_client, ns, "warehouse", {"DATABASE_URL": "postgresql://unused@127.0.0.1:1/x"})
    operator = start_operator(shell_image(cluster, script))
    create_backfill(kube_client, ns, backfill("overlap", activeDeadlineSeconds=3))
    wait_phase(kube_client, ns, "overlap", "Failed", operator, timeout=180)

    def both_ended() -> list[str] | None:
        words = trace.read_text().split()  # "start PID" / "end PID", in the order they happened
        return words if len(words) == 8 else None

    lines = wait_for(both_ended, timeout=30)
    events = lines[0::2]
    assert events == ["start", "end", "start", "end"], trace.read_text()
    first, second = lines[1], lines[5]
    assert lines[3] == first and lines[7] == second and first != second


# ----------------------------------------------------------------------------- TTL


def test_a_chunk_whose_job_its_ttl_deleted_while_the_operator_was_down_is_not_run_again(
    cluster: LocalCluster,
    kube_client: kubernetes.client.ApiClient,
    ready_namespace: str,
    start_operator: Any,
    database_url: str,
    project_outside_tmp: Path,
) -> None:
    ns = ready_namespace
    load_demo_data(database_url, tenants=1, start_date=date(2024, 1, 1), days=2, rows_per_day=3)
    project = project_outside_tmp / "analytics"
    shutil.copytree(REPO_ROOT / "analytics", project, ignore=shutil.ignore_patterns("target", "logs", "dbt_packages"))
    # analytics/packages.yml installs the dbt_backfill package from ../dbt-package.
    shutil.copytree(REPO_ROOT / "dbt-package", project_outside_tmp / "dbt-package")
    image = f"runner-{uuid.uuid4().hex[:8]}:1"
    # The image's environment: the project, and dbt's scratch files in this test's directory.
    cluster.define_image(
        image,
        env={
            "DBT_PROJECT_DIR": str(project),
            "DBT_PROFILES_DIR": str(project),
            "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
        },
    )
    secret(kube_client, ns, "warehouse", {"DATABASE_URL": database_url})
    operator = start_operator(image)
    create_backfill(kube_client, ns, backfill("expired", ttlSecondsAfterFinished=0))
    batch = kubernetes.client.BatchV1Api(kube_client)

    def jobs() -> list[JSON]:
        return list(raw(batch.list_namespaced_job, ns)["items"])

    wait_for(jobs, timeout=60, interval=0.1)
    operator.stop()  # down before the chunk ends: it never sees the Job finish
    wait_for(
        lambda: chunk_rows(database_url) and chunk_rows(database_url)[0][2] != "running",
        timeout=120,
        message=lambda: f"the chunk did not finish: {chunk_rows(database_url)}\n{pod_logs(cluster, ns)}",
    )
    wait_for(lambda: not jobs(), timeout=60, message="the TTL controller did not delete the finished Job")

    operator.start()
    status = wait_phase(kube_client, ns, "expired", "Succeeded", operator, timeout=120)
    rows = chunk_rows(database_url)
    assert [(r[0], r[1], r[2]) for r in rows] == [(0, 1, "completed")], rows  # ran once, never again
    assert status["recordsProcessed"] == rows[0][3] > 0
    creates = [
        e
        for e in cluster.audit_events(username=OPERATOR_USER, verbs=["create"], namespace=ns)
        if e["objectRef"].get("resource") == "jobs"
    ]
    assert len(creates) == 1


# ----------------------------------------------------------------------------- settled Jobs

SETTLED = "dbt-backfill.io/settled"


def test_finished_jobs_are_labelled_settled_once_recorded_and_later_passes_list_only_the_rest(
    cluster: LocalCluster,
    kube_client: kubernetes.client.ApiClient,
    ready_namespace: str,
    start_operator: Any,
    admission_policy: Any,
) -> None:
    """Issue #10: a pass lists only Jobs whose end no status records yet. The label write comes
    after the status; an admission policy that refuses it stands in for an operator killed
    between the two: the status is written, the Jobs stay unlabelled, and once the operator
    is back (restarted, the policy gone) it labels them without running anything again."""
    ns = ready_namespace
    secret(kube_client, ns, "warehouse", {"DATABASE_URL": "postgresql://unused@127.0.0.1:1/x"})
    refusal = admission_policy(
        kube_client,
        ns,
        message="not yet",
        operation="UPDATE",
        expression=f"!has(object.metadata.labels) || !('{SETTLED}' in object.metadata.labels)",
    )
    # Chunk 1's first attempt fails: a retried chunk, and a failed Job whose end is recorded.
    # (exit 1: an ordinary failure; exit 3 is a refusal, never retried)
    image = shell_image(cluster, 'case " $* " in *" --chunk-index 1 --attempt 1 "*) exit 1;; esac; exit 0')
    operator = start_operator(image, unsettled_kept=0)  # label every settled Job at once
    retry = {"limit": 1, "backoffSeconds": 1, "maxBackoffSeconds": 1}
    create_backfill(kube_client, ns, backfill("settling", endDate="2024-01-04", parallelism=2, retry=retry))
    first = wait_phase(kube_client, ns, "settling", "Succeeded", operator)
    assert first["chunks"] == {"total": 4, "succeeded": 4, "failed": 0, "running": 0, "pending": 0}
    batch = kubernetes.client.BatchV1Api(kube_client)

    def jobs_of(name: str, selector: str = "") -> list[JSON]:
        labels = f"dbt-backfill.io/backfill={name}" + (f",{selector}" if selector else "")
        return list(raw(batch.list_namespaced_job, ns, label_selector=labels)["items"])

    made = {(j["metadata"]["labels"]["dbt-backfill.io/chunk"], j["metadata"]["labels"]["dbt-backfill.io/attempt"])
            for j in jobs_of("settling")}  # fmt: skip
    assert made == {("0", "1"), ("1", "1"), ("1", "2"), ("2", "1"), ("3", "1")}
    assert jobs_of("settling", SETTLED) == []  # every label write was refused
    refused = [
        e
        for e in cluster.audit_events(username=OPERATOR_USER, verbs=["patch"], namespace=ns)
        if e["objectRef"].get("resource") == "jobs"
    ]
    assert refused and all(e["responseStatus"]["code"] == 422 for e in refused)

    operator.stop()
    refusal.remove()
    restarted = len(cluster.audit_events(username=OPERATOR_USER))
    operator.start()
    wait_for(
        lambda: len(jobs_of("settling", SETTLED)) == 5,
        timeout=120,
        message=lambda: f"not all settled: {jobs_of('settling', '!' + SETTLED)}\n{operator.logs()[-3000:]}",
    )
    assert status_of(kube_client, ns, "settling")["chunkState"] == first["chunkState"]  # nothing re-counted

    # A second backfill, without the policy: its Jobs (its chunk 1 fails once too) are labelled as
    # the passes record them.
    create_backfill(kube_client, ns, backfill("later", startDate="2024-02-01", endDate="2024-02-03", parallelism=1))
    later = wait_phase(kube_client, ns, "later", "Succeeded", operator)
    assert later["progress"] == "3/3"
    wait_for(lambda: len(jobs_of("later", SETTLED)) == 4, timeout=60, message=lambda: operator.logs()[-3000:])
    assert jobs_of("later", "!" + SETTLED) == [] and jobs_of("settling", "!" + SETTLED) == []

    after = [e for e in cluster.audit_events(username=OPERATOR_USER)[restarted:] if e.get("objectRef")]
    job_creates = [
        e
        for e in cluster.audit_events(username=OPERATOR_USER, verbs=["create"], namespace=ns)
        if e["objectRef"].get("resource") == "jobs" and e["responseStatus"]["code"] == 201
    ]
    assert len(job_creates) == 5 + 4  # nothing ran again after the restart
    reads = [e for e in after if e["objectRef"].get("resource") == "jobs" and e["verb"] in ("list", "watch")]
    assert reads
    for event in reads:  # the passes' lists and kopf's watch alike leave settled Jobs out
        [selector] = parse_qs(urlsplit(event["requestURI"]).query).get("labelSelector") or [""]
        assert f"!{SETTLED}" in selector, event["requestURI"]
    pod_lists = [e for e in after if e["objectRef"].get("resource") == "pods" and e["verb"] == "list"]
    assert pod_lists
    assert all(
        "status.phase!=Succeeded" in (parse_qs(urlsplit(e["requestURI"]).query).get("fieldSelector") or [""])[0]
        for e in pod_lists
        if "dbt-backfill.io/chunk" not in e["requestURI"]
    )
