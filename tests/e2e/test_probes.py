"""Startup, liveness and readiness probes as the node agent plays them, seen through the real API server.

The containers are host processes (host network), so an ``httpGet``/``tcpSocket`` probe reaches them
on 127.0.0.1 at a port each test picks free. A test flips a probe's outcome by creating or removing
a file in the container's home directory (the agent's per-container directory).
"""

from __future__ import annotations

import socket
from pathlib import Path

import kubernetes.client
import pytest

from localcluster.cluster import LocalCluster
from tests.e2e.test_kubelet_api import container_status, pod_dir, running
from tests.e2e.test_localcluster import JSON, conditions, core, pod, raw, read_pod
from tests.support.polling import wait_for

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return True
    except OSError:
        return False


def http_server(port: int) -> list[str]:
    """A container serving its ``$HOME/www`` on ``port``."""
    return ["sh", "-c", f'mkdir -p "$HOME/www" && exec python -m http.server {port} --bind 127.0.0.1 -d "$HOME/www"']


def pod_ready(kube_client: kubernetes.client.ApiClient, namespace: str, name: str) -> str:
    return str(conditions(read_pod(kube_client, namespace, name)).get("Ready", {}).get("status"))


def events(kube_client: kubernetes.client.ApiClient, namespace: str, name: str) -> list[JSON]:
    selector = f"involvedObject.name={name}"
    return list(raw(core(kube_client).list_namespaced_event, namespace, field_selector=selector)["items"])


def event_messages(kube_client: kubernetes.client.ApiClient, namespace: str, name: str, reason: str) -> list[str]:
    return [e["message"] for e in events(kube_client, namespace, name) if e["reason"] == reason]


def home(cluster: LocalCluster, kube_client: kubernetes.client.ApiClient, namespace: str, name: str) -> Path:
    return pod_dir(cluster, kube_client, namespace, name) / "main"


def test_an_http_readiness_probe_drives_container_and_pod_readiness(
    cluster: LocalCluster, kube_client: kubernetes.client.ApiClient, namespace: str
) -> None:
    port = free_port()
    probe = {"httpGet": {"path": "/ready.txt", "port": "web"}, "periodSeconds": 1, "failureThreshold": 1}
    container = {"ports": [{"name": "web", "containerPort": port}], "readinessProbe": probe}
    raw(core(kube_client).create_namespaced_pod, namespace, pod("web", http_server(port), container=container))

    # Serving, but /ready.txt is 404: running and not ready, with the kubelet's Event.
    not_found = "Readiness probe failed: HTTP probe failed with statuscode: 404"
    wait_for(lambda: not_found in event_messages(kube_client, namespace, "web", "Unhealthy"), timeout=120)
    status = container_status(kube_client, namespace, "web", "main")
    assert "running" in status["state"] and status["ready"] is False and status["started"] is True
    assert pod_ready(kube_client, namespace, "web") == "False"
    assert conditions(read_pod(kube_client, namespace, "web"))["ContainersReady"]["status"] == "False"

    (home(cluster, kube_client, namespace, "web") / "www" / "ready.txt").write_text("ok")
    wait_for(lambda: pod_ready(kube_client, namespace, "web") == "True", timeout=120)
    assert container_status(kube_client, namespace, "web", "main")["ready"] is True
    assert conditions(read_pod(kube_client, namespace, "web"))["ContainersReady"]["status"] == "True"

    (home(cluster, kube_client, namespace, "web") / "www" / "ready.txt").unlink()
    wait_for(lambda: pod_ready(kube_client, namespace, "web") == "False", timeout=120)
    assert container_status(kube_client, namespace, "web", "main")["restartCount"] == 0  # readiness never restarts


def test_a_failing_exec_liveness_probe_restarts_the_container(
    kube_client: kubernetes.client.ApiClient, namespace: str
) -> None:
    probe = {"exec": {"command": ["sh", "-c", 'test -f "$HOME/alive"']}, "periodSeconds": 1, "failureThreshold": 2}
    body = pod("unhealthy", ["sleep", "3600"], restartPolicy="Always", terminationGracePeriodSeconds=5,
               container={"livenessProbe": probe})  # fmt: skip
    raw(core(kube_client).create_namespaced_pod, namespace, body)

    restarted = wait_for(
        lambda: (s := container_status(kube_client, namespace, "unhealthy", "main")).get("restartCount", 0) >= 2 and s,
        timeout=180,
    )
    terminated = restarted["lastState"]["terminated"]
    assert terminated["exitCode"] == 143  # SIGTERM, the grace period's first step, ended it
    assert terminated["reason"] == "Error"
    assert "Container main failed liveness probe, will be restarted" in event_messages(
        kube_client, namespace, "unhealthy", "Killing"
    )
    assert any(m.startswith("Liveness probe failed: ") for m in event_messages(kube_client, namespace, "unhealthy",
                                                                                "Unhealthy"))  # fmt: skip
    assert read_pod(kube_client, namespace, "unhealthy")["status"]["phase"] == "Running"


def test_a_startup_probe_holds_back_a_tcp_readiness_probe_until_it_passes(
    cluster: LocalCluster, kube_client: kubernetes.client.ApiClient, namespace: str
) -> None:
    port = free_port()
    startup = {"exec": {"command": ["sh", "-c", 'test -f "$HOME/started"']}, "periodSeconds": 1,
               "failureThreshold": 1000}  # fmt: skip
    readiness = {"tcpSocket": {"port": port}, "periodSeconds": 1}
    body = pod("slow-start", http_server(port), container={"startupProbe": startup, "readinessProbe": readiness})
    raw(core(kube_client).create_namespaced_pod, namespace, body)

    # The server listens (the tcp probe would pass), but the startup probe has not passed yet.
    wait_for(lambda: running(kube_client, namespace, "slow-start") and listening(port), timeout=120)
    failures = len(event_messages(kube_client, namespace, "slow-start", "Unhealthy"))
    # Two more startup periods with the port open: a readiness probe, had it run, would have passed.
    wait_for(lambda: len(event_messages(kube_client, namespace, "slow-start", "Unhealthy")) >= failures + 2,
             timeout=120)  # fmt: skip
    status = container_status(kube_client, namespace, "slow-start", "main")
    assert status["started"] is False and status["ready"] is False
    assert all(m.startswith("Startup probe failed: ") for m in event_messages(kube_client, namespace, "slow-start",
                                                                               "Unhealthy"))  # fmt: skip

    (home(cluster, kube_client, namespace, "slow-start") / "started").touch()
    wait_for(lambda: pod_ready(kube_client, namespace, "slow-start") == "True", timeout=120)
    status = container_status(kube_client, namespace, "slow-start", "main")
    assert status["started"] is True and status["ready"] is True and status["restartCount"] == 0


def test_a_failing_tcp_startup_probe_kills_a_never_restarted_container_and_fails_the_pod(
    kube_client: kubernetes.client.ApiClient, namespace: str
) -> None:
    startup = {"tcpSocket": {"port": free_port()}, "periodSeconds": 1, "failureThreshold": 2}
    body = pod("never-up", ["sleep", "3600"], terminationGracePeriodSeconds=5, container={"startupProbe": startup})
    raw(core(kube_client).create_namespaced_pod, namespace, body)

    failed = wait_for(lambda: (p := read_pod(kube_client, namespace, "never-up"))["status"]["phase"] == "Failed" and p,
                      timeout=120)  # fmt: skip
    terminated = failed["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 143
    assert "Container main failed startup probe, will not be restarted" in event_messages(
        kube_client, namespace, "never-up", "Killing"
    )
    unhealthy = event_messages(kube_client, namespace, "never-up", "Unhealthy")
    assert any("Startup probe failed: dial tcp 127.0.0.1:" in m and "connection refused" in m for m in unhealthy)


def deployment(name: str, script: str, readiness: JSON) -> JSON:
    labels = {"app": name}
    container = {"name": "main", "image": "host", "command": ["sh", "-c", script], "readinessProbe": readiness}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}},
        },
    }


def test_a_deployment_rollout_completes_once_its_pods_pass_their_readiness_probe(
    cluster: LocalCluster, kube_client: kubernetes.client.ApiClient, namespace: str
) -> None:
    readiness = {"exec": {"command": ["sh", "-c", 'test -f "$HOME/ready"']}, "periodSeconds": 1}
    apps = kubernetes.client.AppsV1Api(kube_client)
    raw(apps.create_namespaced_deployment, namespace, deployment("app", "exec sleep 3600", readiness))

    def rollout(timeout: str) -> tuple[int, str]:
        result = cluster.kubectl("rollout", "status", "deployment/app", "-n", namespace, f"--timeout={timeout}",
                                 check=False)  # fmt: skip
        return result.returncode, result.stdout + result.stderr

    def the_pod() -> JSON | None:
        items = raw(core(kube_client).list_namespaced_pod, namespace, label_selector="app=app")["items"]
        live = [p for p in items if not p["metadata"].get("deletionTimestamp")]
        return live[0] if len(live) == 1 and "running" in str(live[0]["status"].get("containerStatuses")) else None

    first = wait_for(the_pod, timeout=120)
    code, output = rollout("2s")  # running, never ready: the rollout cannot complete
    assert code != 0 and "timed out" in output
    (cluster.node_state_dir / "pods" / f"{namespace}_{first['metadata']['name']}_{first['metadata']['uid']}" / "main"
     / "ready").touch()  # fmt: skip
    code, output = rollout("120s")
    assert code == 0, output
    assert 'deployment "app" successfully rolled out' in output

    # A new template: a new ReplicaSet whose Pod gets ready by itself replaces the first one.
    cluster.kubectl("patch", "deployment/app", "-n", namespace, "--type=json", "-p",
                    '[{"op": "replace", "path": "/spec/template/spec/containers/0/command/2",'
                    ' "value": "touch \\"$HOME/ready\\"; exec sleep 3600"}]')  # fmt: skip
    code, output = rollout("120s")
    assert code == 0, output
    status = raw(apps.read_namespaced_deployment, "app", namespace)["status"]
    assert status["updatedReplicas"] == status["readyReplicas"] == status["availableReplicas"] == 1
    wait_for(lambda: (p := the_pod()) and p["metadata"]["uid"] != first["metadata"]["uid"], timeout=120)
