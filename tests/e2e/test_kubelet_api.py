"""``kubectl logs`` through the real API server to the node agent's kubelet API, and who that API lets in.

kubectl asks kube-apiserver for ``pods/log``; the API server looks the Node's kubelet endpoint up
and calls it with its kubelet client certificate; the agent authenticates that certificate and asks
the API server (SubjectAccessReview) whether the user may use ``nodes/proxy``. Every hop is real.
"""

from __future__ import annotations

import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest

from localcluster.cluster import LocalCluster
from localcluster.pki import PKI
from tests.e2e.test_localcluster import JSON, batch, core, job, job_with, pod, raw, read_pod
from tests.support.polling import wait_for

pytestmark = pytest.mark.e2e


def container_status(kube_client: kubernetes.client.ApiClient, namespace: str, name: str, container: str) -> JSON:
    statuses = read_pod(kube_client, namespace, name)["status"].get("containerStatuses") or []
    return next((s for s in statuses if s["name"] == container), {})


def running(kube_client: kubernetes.client.ApiClient, namespace: str, name: str, container: str = "main") -> bool:
    return "running" in container_status(kube_client, namespace, name, container).get("state", {})


def pod_dir(cluster: LocalCluster, kube_client: kubernetes.client.ApiClient, namespace: str, name: str) -> Path:
    uid = read_pod(kube_client, namespace, name)["metadata"]["uid"]
    return cluster.node_state_dir / "pods" / f"{namespace}_{name}_{uid}"


def logs(cluster: LocalCluster, namespace: str, *args: str) -> str:
    return cluster.kubectl("logs", "-n", namespace, *args).stdout


def test_kubectl_logs_reads_the_container_log_with_tail_and_limit(
    cluster: LocalCluster, kube_client: kubernetes.client.ApiClient, namespace: str
) -> None:
    script = "echo one; echo two; echo three; exec sleep 3600"
    raw(core(kube_client).create_namespaced_pod, namespace, pod("talker", ["sh", "-c", script]))
    wait_for(lambda: running(kube_client, namespace, "talker") and "three" in logs(cluster, namespace, "talker"),
             timeout=120)  # fmt: skip

    assert logs(cluster, namespace, "talker") == "one\ntwo\nthree\n"
    assert logs(cluster, namespace, "talker", "--tail=2") == "two\nthree\n"
    assert logs(cluster, namespace, "talker", "--tail=0") == ""
    assert logs(cluster, namespace, "talker", "--limit-bytes=6") == "one\ntw"
    timestamps = cluster.kubectl("logs", "-n", namespace, "talker", "--timestamps", check=False)
    assert timestamps.returncode != 0
    assert "timestamps is not supported by this node agent" in timestamps.stderr


def test_kubectl_logs_container_flag_picks_one_of_two_containers(
    cluster: LocalCluster, kube_client: kubernetes.client.ApiClient, namespace: str
) -> None:
    body = pod("pair", ["sh", "-c", "echo from-first; exec sleep 3600"])
    body["spec"]["containers"].append({"name": "second", "image": "host",
                                       "command": ["sh", "-c", "echo from-second; exec sleep 3600"]})  # fmt: skip
    raw(core(kube_client).create_namespaced_pod, namespace, body)
    wait_for(lambda: running(kube_client, namespace, "pair", "second")
             and "from-second" in logs(cluster, namespace, "pair", "-c", "second"), timeout=120)  # fmt: skip

    assert logs(cluster, namespace, "pair", "-c", "second") == "from-second\n"
    assert logs(cluster, namespace, "pair", "-c", "main") == "from-first\n"


def test_kubectl_logs_previous_shows_the_instance_before_the_restart(
    cluster: LocalCluster, kube_client: kubernetes.client.ApiClient, namespace: str
) -> None:
    # The emptyDir outlives a restart: the first run fails, the second one stays up.
    script = 'n=$(cat "$DATA/n" 2>/dev/null || echo 0); echo "run $n"; echo $((n + 1)) > "$DATA/n"; ' \
             '[ "$n" -ge 1 ] && exec sleep 3600; exit 1'  # fmt: skip
    body = pod("restarter", ["sh", "-c", script], restartPolicy="OnFailure",
               volumes=[{"name": "data", "emptyDir": {}}],
               container={"env": [{"name": "DATA", "value": "/data"}],
                          "volumeMounts": [{"name": "data", "mountPath": "/data"}]})  # fmt: skip
    raw(core(kube_client).create_namespaced_pod, namespace, body)
    wait_for(lambda: running(kube_client, namespace, "restarter")
             and container_status(kube_client, namespace, "restarter", "main")["restartCount"] == 1
             and "run 1" in logs(cluster, namespace, "restarter"), timeout=120)  # fmt: skip

    assert logs(cluster, namespace, "restarter") == "run 1\n"
    assert logs(cluster, namespace, "restarter", "--previous") == "run 0\n"


def test_kubectl_logs_previous_without_a_restart_is_refused(
    cluster: LocalCluster, kube_client: kubernetes.client.ApiClient, namespace: str
) -> None:
    raw(core(kube_client).create_namespaced_pod, namespace, pod("once", ["sh", "-c", "echo hi; exec sleep 3600"]))
    wait_for(lambda: running(kube_client, namespace, "once") and "hi" in logs(cluster, namespace, "once"),
             timeout=120)  # fmt: skip
    result = cluster.kubectl("logs", "-n", namespace, "once", "--previous", check=False)
    assert result.returncode != 0
    assert 'previous terminated container "main" in pod "once" not found' in result.stderr


def test_kubectl_logs_follow_streams_until_the_container_exits(
    cluster: LocalCluster, kube_client: kubernetes.client.ApiClient, namespace: str
) -> None:
    script = 'echo first; while [ ! -f "$HOME/stop" ]; do sleep 0.1; done; echo last'
    raw(core(kube_client).create_namespaced_pod, namespace, pod("follower", ["sh", "-c", script]))
    wait_for(lambda: running(kube_client, namespace, "follower"), timeout=120)
    argv = [str(cluster.kubectl_path), f"--kubeconfig={cluster.kubeconfig}", "logs", "-f", "-n", namespace, "follower"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as follow:
        try:
            assert follow.stdout is not None
            # Read while the container still runs: the stream is open before it exits.
            assert follow.stdout.readline() == "first\n"
            assert follow.poll() is None
            (pod_dir(cluster, kube_client, namespace, "follower") / "main" / "stop").touch()
            rest, errors = follow.communicate(timeout=120)
        finally:
            follow.kill()
    assert follow.returncode == 0, errors
    assert rest == "last\n"
    wait_for(lambda: read_pod(kube_client, namespace, "follower")["status"]["phase"] == "Succeeded", timeout=120)


def test_kubectl_logs_of_a_job_reads_its_pod(
    cluster: LocalCluster, kube_client: kubernetes.client.ApiClient, namespace: str
) -> None:
    raw(batch(kube_client).create_namespaced_job, namespace, job("report", "echo chunk 1 of 3 done"))
    wait_for(lambda: job_with(kube_client, namespace, "report", "Complete"), timeout=120)
    assert logs(cluster, namespace, "job/report") == "chunk 1 of 3 done\n"


# -- the endpoint itself ------------------------------------------------------------------------------


def kubelet_url(cluster: LocalCluster, kube_client: kubernetes.client.ApiClient, path: str) -> str:
    node = raw(core(kube_client).read_node, cluster.node_name)
    port = node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
    assert port > 0
    addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    assert addresses == {"InternalIP": "127.0.0.1", "Hostname": cluster.node_name}
    return f"https://127.0.0.1:{port}{path}"


def get(url: str, context: ssl.SSLContext) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, context=context, timeout=30) as response:  # noqa: S310  # https, loopback
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def client_context(cluster: LocalCluster, cert: Any = None) -> ssl.SSLContext:
    """Verifies the agent's serving certificate against the cluster CA; presents ``cert`` if given."""
    context = ssl.create_default_context(cafile=str(cluster.control_plane.pki.ca.cert))
    if cert is not None:
        context.load_cert_chain(str(cert.cert), str(cert.key))
    return context


@pytest.fixture
def sleeper(kube_client: kubernetes.client.ApiClient, namespace: str) -> str:
    raw(core(kube_client).create_namespaced_pod, namespace, pod("sleeper", ["sh", "-c", "echo zzz; exec sleep 3600"]))
    wait_for(lambda: running(kube_client, namespace, "sleeper"), timeout=120)
    return f"/containerLogs/{namespace}/sleeper/main"


def test_the_api_server_kubelet_client_reads_logs_and_gets_kubelet_like_404s(
    cluster: LocalCluster, kube_client: kubernetes.client.ApiClient, namespace: str, sleeper: str
) -> None:
    pki = cluster.control_plane.pki
    apiserver = client_context(cluster, pki.certificate("kube-apiserver-kubelet-client",
                                                        common_name="kube-apiserver-kubelet-client"))  # fmt: skip
    assert wait_for(lambda: get(kubelet_url(cluster, kube_client, sleeper), apiserver)[1], timeout=60) == "zzz\n"
    status, body = get(kubelet_url(cluster, kube_client, f"/containerLogs/{namespace}/nobody/main"), apiserver)
    assert (status, body) == (404, 'pod "nobody" does not exist\n')
    status, body = get(kubelet_url(cluster, kube_client, f"/containerLogs/{namespace}/sleeper/nope"), apiserver)
    assert (status, body) == (404, 'container "nope" not found in pod "sleeper"\n')


def test_the_kubelet_api_refuses_clients_without_a_cluster_certificate_or_without_rights(
    cluster: LocalCluster, kube_client: kubernetes.client.ApiClient, sleeper: str, tmp_path: Path
) -> None:
    url = kubelet_url(cluster, kube_client, sleeper)

    assert get(url, client_context(cluster)) == (401, "Unauthorized\n")

    stranger = PKI(tmp_path / "other-ca").certificate("intruder", common_name="kube-apiserver-kubelet-client")
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionResetError)):
        get(url, client_context(cluster, stranger))

    # Signed by the cluster CA, so authenticated, but nothing binds this user to nodes/proxy.
    nobody = cluster.control_plane.pki.certificate("kubelet-api-nobody", common_name="nobody")
    status, body = get(url, client_context(cluster, nobody))
    assert status == 403
    assert body.startswith("Forbidden (user=nobody, verb=get, resource=nodes, subresource=proxy)")
