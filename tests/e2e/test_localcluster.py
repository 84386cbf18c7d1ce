"""The local cluster itself: real controllers acting on what the node agent reports, as on a real node.

Each test gives the real Job, TTL and garbage-collector controllers, the scheduler and RBAC
something the node agent must get right for them to react as they do in a cluster.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest

from localcluster.cluster import LocalCluster
from tests.support.polling import wait_for

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
JSON = dict[str, Any]


def raw(call: Any, *args: Any, **kwargs: Any) -> JSON:
    response = call(*args, _preload_content=False, **kwargs)
    return dict(json.loads(response.data))


def core(client: kubernetes.client.ApiClient) -> Any:
    return kubernetes.client.CoreV1Api(client)


def batch(client: kubernetes.client.ApiClient) -> Any:
    return kubernetes.client.BatchV1Api(client)


def job(name: str, script: str, **spec: Any) -> JSON:
    container = {"name": "main", "image": "host", "command": ["sh", "-c", script]}
    container |= spec.pop("container", {})
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {"spec": {"restartPolicy": "Never", "containers": [container]}},
            **spec,
        },
    }


def pod(name: str, command: list[str], **spec: Any) -> JSON:
    container = {"name": "main", "image": "host", "command": command} | spec.pop("container", {})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "containers": [container], **spec},
    }


def conditions(obj: JSON) -> dict[str, JSON]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}


def job_with(client: kubernetes.client.ApiClient, namespace: str, name: str, condition: str) -> JSON | None:
    """The Job once it has ``condition`` (True), else None."""
    obj = raw(batch(client).read_namespaced_job, name, namespace)
    return obj if conditions(obj).get(condition, {}).get("status") == "True" else None


def job_pods(client: kubernetes.client.ApiClient, namespace: str, name: str) -> list[JSON]:
    selector = f"batch.kubernetes.io/job-name={name}"
    return list(raw(core(client).list_namespaced_pod, namespace, label_selector=selector)["items"])


def read_pod(client: kubernetes.client.ApiClient, namespace: str, name: str) -> JSON:
    return raw(core(client).read_namespaced_pod, name, namespace)


def log_text(cluster: LocalCluster, namespace: str, pod_name: str) -> str:
    return "".join(path.read_text() for path in cluster.pod_logs(namespace, pod_name))


def test_a_job_whose_pod_exits_0_completes_through_the_real_job_controller(
    cluster: LocalCluster, kube_client: kubernetes.client.ApiClient, namespace: str
) -> None:
    raw(core(kube_client).create_namespaced_secret, namespace,
        {"metadata": {"name": "db"}, "stringData": {"url": "postgresql://somewhere"}})  # fmt: skip
    body = job("ok", 'echo "url=$URL greeting=$GREETING" && pwd', container={"env": [
        {"name": "URL", "valueFrom": {"secretKeyRef": {"name": "db", "key": "url"}}},
        {"name": "NAME", "value": "world"},
        {"name": "GREETING", "value": "hello $(NAME)"},
    ]})  # fmt: skip
    raw(batch(kube_client).create_namespaced_job, namespace, body)

    done = wait_for(lambda: job_with(kube_client, namespace, "ok", "Complete"), timeout=120)
    assert conditions(done)["Complete"]["status"] == "True"
    assert conditions(done)["SuccessCriteriaMet"]["status"] == "True"
    assert done["status"]["succeeded"] == 1
    [finished] = job_pods(kube_client, namespace, "ok")
    status = finished["status"]
    assert status["phase"] == "Succeeded"
    assert status["podIP"] == status["hostIP"] == "127.0.0.1"
    assert finished["spec"]["nodeName"] == cluster.node_name  # bound by the real scheduler
    terminated = status["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 0 and terminated["reason"] == "Completed"
    assert terminated["startedAt"] <= terminated["finishedAt"]
    assert {"PodScheduled", "Initialized", "ContainersReady", "Ready", "PodReadyToStartContainers"} <= set(
        conditions(finished)
    )
    assert conditions(finished)["Ready"]["reason"] == "PodCompleted"
    out = log_text(cluster, namespace, finished["metadata"]["name"])
    assert "url=postgresql://somewhere greeting=hello world" in out
    assert str(REPO_ROOT) in out  # the containers' working directory


def test_a_failing_pod_with_backoff_limit_0_fails_the_job_after_failure_target(
    kube_client: kubernetes.client.ApiClient, namespace: str
) -> None:
    raw(batch(kube_client).create_namespaced_job, namespace, job("bad", "echo about to fail >&2; exit 3"))

    failed = wait_for(lambda: job_with(kube_client, namespace, "bad", "Failed"), timeout=120)
    assert conditions(failed)["FailureTarget"]["reason"] == "BackoffLimitExceeded"
    assert conditions(failed)["Failed"]["reason"] == "BackoffLimitExceeded"
    assert failed["status"]["failed"] == 1
    assert "completionTime" not in failed["status"]
    [failed_pod] = job_pods(kube_client, namespace, "bad")
    assert failed_pod["status"]["phase"] == "Failed"
    terminated = failed_pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 3 and terminated["reason"] == "Error"


def test_a_missing_secret_key_waits_in_create_container_config_error_until_it_appears(
    cluster: LocalCluster, kube_client: kubernetes.client.ApiClient, namespace: str
) -> None:
    raw(
        core(kube_client).create_namespaced_secret,
        namespace,
        {"metadata": {"name": "db"}, "stringData": {"other": "x"}},
    )
    body = pod("needs-secret", ["sh", "-c", 'echo "got $URL and [$MAYBE]"'], container={"env": [
        {"name": "URL", "valueFrom": {"secretKeyRef": {"name": "db", "key": "url"}}},
        {"name": "MAYBE", "valueFrom": {"configMapKeyRef": {"name": "absent", "key": "k", "optional": True}}},
    ]})  # fmt: skip
    raw(core(kube_client).create_namespaced_pod, namespace, body)

    def waiting() -> JSON | None:
        statuses = read_pod(kube_client, namespace, "needs-secret")["status"].get("containerStatuses") or []
        return statuses[0]["state"].get("waiting") if statuses else None

    state = wait_for(lambda: (w := waiting()) and w["reason"] == "CreateContainerConfigError" and w, timeout=120)
    assert state["message"] == f"couldn't find key url in Secret {namespace}/db"
    assert read_pod(kube_client, namespace, "needs-secret")["status"]["phase"] == "Pending"

    raw(core(kube_client).patch_namespaced_secret, "db", namespace, {"stringData": {"url": "postgresql://late"}})
    wait_for(lambda: read_pod(kube_client, namespace, "needs-secret")["status"]["phase"] == "Succeeded", timeout=120)
    assert "got postgresql://late and []" in log_text(cluster, namespace, "needs-secret")


def test_deleting_a_running_pod_sends_sigterm_then_the_agent_completes_the_deletion(
    cluster: LocalCluster, kube_client: kubernetes.client.ApiClient, namespace: str
) -> None:
    script = (
        "import signal, sys, time\n"
        "def stop(signum, frame):\n"
        "    print('got SIGTERM', flush=True); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n"
    )
    raw(core(kube_client).create_namespaced_pod, namespace,
        pod("graceful", ["python", "-c", script], terminationGracePeriodSeconds=30))  # fmt: skip
    wait_for(lambda: "ready" in log_text(cluster, namespace, "graceful"), timeout=120)
    running = read_pod(kube_client, namespace, "graceful")["status"]
    assert running["phase"] == "Running"
    assert "running" in running["containerStatuses"][0]["state"]
    assert conditions(read_pod(kube_client, namespace, "graceful"))["Ready"]["status"] == "True"

    raw(core(kube_client).delete_namespaced_pod, "graceful", namespace)

    def gone() -> bool:
        try:
            read_pod(kube_client, namespace, "graceful")
        except kubernetes.client.ApiException as e:
            return e.status == 404
        return False

    wait_for(gone, timeout=120)
    assert "got SIGTERM" in log_text(cluster, namespace, "graceful")


def test_active_deadline_kills_the_pod_and_fails_it_with_deadline_exceeded(
    kube_client: kubernetes.client.ApiClient, namespace: str
) -> None:
    raw(core(kube_client).create_namespaced_pod, namespace, pod("slow", ["sleep", "120"], activeDeadlineSeconds=1))
    failed = wait_for(lambda: (p := read_pod(kube_client, namespace, "slow"))["status"]["phase"] == "Failed" and p,
                      timeout=120)  # fmt: skip
    assert failed["status"]["reason"] == "DeadlineExceeded"
    terminated = failed["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 143  # SIGTERM


def test_restart_policy_on_failure_restarts_in_the_same_pod_keeping_its_empty_dir(
    cluster: LocalCluster, kube_client: kubernetes.client.ApiClient, namespace: str
) -> None:
    script = 'if [ -f "$DIR/seen" ]; then echo second try; exit 0; fi; touch "$DIR/seen"; echo first try; exit 1'
    body = pod("flaky", ["sh", "-c", script], restartPolicy="OnFailure",
               volumes=[{"name": "scratch", "emptyDir": {}}],
               container={"volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
                          "env": [{"name": "DIR", "value": "/scratch"}]})  # fmt: skip
    raw(core(kube_client).create_namespaced_pod, namespace, body)
    done = wait_for(lambda: (p := read_pod(kube_client, namespace, "flaky"))["status"]["phase"] == "Succeeded" and p,
                    timeout=120)  # fmt: skip
    status = done["status"]["containerStatuses"][0]
    assert status["restartCount"] == 1
    assert status["lastState"]["terminated"]["exitCode"] == 1
    assert status["state"]["terminated"]["exitCode"] == 0
    assert log_text(cluster, namespace, "flaky").splitlines() == ["first try", "second try"]


def test_ttl_after_finished_deletes_the_job_and_the_garbage_collector_its_pod(
    cluster: LocalCluster, kube_client: kubernetes.client.ApiClient, namespace: str
) -> None:
    raw(batch(kube_client).create_namespaced_job, namespace, job("brief", "true", ttlSecondsAfterFinished=0))
    wait_for(lambda: job_pods(kube_client, namespace, "brief"), timeout=120)
    wait_for(lambda: not raw(batch(kube_client).list_namespaced_job, namespace)["items"], timeout=120)
    wait_for(lambda: not job_pods(kube_client, namespace, "brief"), timeout=120)

    def deleters() -> dict[str, str] | None:
        events = cluster.audit_events(verbs=["delete"], namespace=namespace)
        found = {e["objectRef"]["resource"]: e["user"]["username"] for e in events if e["responseStatus"]["code"] < 300}
        return found if {"jobs", "pods"} <= set(found) else None

    found = wait_for(deleters, timeout=10)
    assert found["jobs"] == "system:serviceaccount:kube-system:ttl-after-finished-controller"
    # The GC deletes the Pod gracefully; the node agent (as the Node) completes it with grace 0.
    pod_deletes = {e["user"]["username"] for e in cluster.audit_events(verbs=["delete"], namespace=namespace)
                   if e["objectRef"]["resource"] == "pods"}  # fmt: skip
    assert "system:serviceaccount:kube-system:generic-garbage-collector" in pod_deletes
    assert f"system:node:{cluster.node_name}" in pod_deletes


def test_rbac_of_deploy_grants_the_operator_what_it_uses_and_nothing_else(
    cluster: LocalCluster, operator_kubeconfig: Path, namespace: str
) -> None:
    def can(verb: str, resource: str) -> bool:
        result = cluster.kubectl("auth", "can-i", verb, resource, "-n", namespace, kubeconfig=operator_kubeconfig,
                                 check=False)  # fmt: skip
        return result.stdout.strip() == "yes"

    # get secrets: the policy reads the labels of the one Secret a backfill names (metadata only);
    # list pods: why a chunk's Pod never started, and whether an earlier attempt's Pod still runs;
    # get configmaps: the one ConfigMap a matrix backfill's tenantIdsFrom names;
    # patch jobs: the settled label on a finished Job whose end the status records.
    granted = [("create", "jobs.batch"), ("delete", "jobs.batch"), ("watch", "dbtbackfills.dbt-backfill.io"),
               ("patch", "dbtbackfills.dbt-backfill.io/status"), ("create", "events"), ("get", "secrets"),
               ("list", "pods"), ("get", "configmaps"), ("patch", "jobs.batch")]  # fmt: skip
    for verb, resource in granted:
        assert can(verb, resource), f"deploy/ should grant {verb} {resource}"
    for verb, resource in [("list", "secrets"), ("watch", "secrets"), ("get", "pods/log"), ("delete", "pods"),
                           ("update", "jobs.batch"), ("delete", "dbtbackfills.dbt-backfill.io"),
                           ("create", "pods"), ("list", "configmaps"), ("watch", "configmaps"),
                           ("update", "configmaps")]:  # fmt: skip
        assert not can(verb, resource), f"deploy/ must not grant {verb} {resource}"
    denied = cluster.kubectl("get", "secrets", "-n", namespace, kubeconfig=operator_kubeconfig, check=False)
    assert denied.returncode != 0
    assert 'User "system:serviceaccount:dbt-backfill-system:dbt-backfill-operator" cannot list resource "secrets"' in (
        denied.stderr
    )


def test_up_is_idempotent_and_keeps_every_process(cluster: LocalCluster) -> None:
    before = {name: process.pid() for name, process in cluster.control_plane.processes.items()}
    agent = cluster.agent.pid()
    cluster.up()
    assert {name: process.pid() for name, process in cluster.control_plane.processes.items()} == before
    assert cluster.agent.pid() == agent
    assert all(cluster.status().values())
