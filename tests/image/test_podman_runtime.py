"""The podman runtime: Pods on a real cluster (``podman_cluster``) run in their images, as a kubelet runs them.

Each test gives the node agent a Pod whose outcome depends on what podman really enforced: the
image's presence and pull policy, the user, the read-only root, capabilities, seccomp and
no-new-privileges seen from inside (``/proc/self/status``), the cgroup limits, the kernel's OOM
killer, signals through tini, a ServiceAccount token the API server accepts, and the real Job
controller acting on the result. The test image is the project's Debian base with a numeric user
and tini as entrypoint (built here in seconds, no network); the base itself runs as root.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import kubernetes.client
import kubernetes.config
import kubernetes.watch
import pytest

from dbtbackfill.operator import pod_start
from localcluster.cluster import LocalCluster
from localcluster.node_agent import AgentConfig, NodeAgent
from localcluster.pod_volumes import PodVolumes
from localcluster.podman_runtime import PodmanRuntime
from localcluster.runtime import ContainerSpec, SecurityContext
from tests.conftest import REPO_ROOT
from tests.support.polling import wait_for

pytestmark = pytest.mark.image

JSON = dict[str, Any]
BASE_IMAGE = "localhost/dbt-backfill-base:python3.11-bookworm"
TEST_IMAGE = "localhost/localcluster-podman-test:tini-10001"
ABSENT_IMAGE = "localhost/localcluster-podman-test:absent"
CONTAINERFILE = f"""\
FROM {BASE_IMAGE}
USER 10001:10001
WORKDIR /srv
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["python", "-c", "print('the image cmd')"]
"""
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


@pytest.fixture(scope="module")
def test_image() -> str:
    base = subprocess.run([str(REPO_ROOT / "deploy" / "image" / "local-base.sh"), BASE_IMAGE],
                          capture_output=True, text=True, timeout=1800, check=False)  # fmt: skip
    assert base.returncode == 0, base.stderr[-3000:]
    with tempfile.TemporaryDirectory() as context:
        (Path(context) / "Containerfile").write_text(CONTAINERFILE)
        build = subprocess.run(["podman", "build", "--pull=never", "--quiet", "--tag", TEST_IMAGE, context],
                               capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    return TEST_IMAGE


@pytest.fixture
def client(podman_kube_client: kubernetes.client.ApiClient) -> kubernetes.client.ApiClient:
    return podman_kube_client


@pytest.fixture
def ns(podman_namespace: str) -> str:
    return podman_namespace


def core(client: kubernetes.client.ApiClient) -> Any:
    return kubernetes.client.CoreV1Api(client)


def raw(call: Any, *args: Any, **kwargs: Any) -> JSON:
    response = call(*args, _preload_content=False, **kwargs)
    return dict(json.loads(response.data))


def pod(name: str, *containers: JSON, **spec: Any) -> JSON:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "containers": list(containers), **spec}}  # fmt: skip


def create(client: kubernetes.client.ApiClient, ns: str, body: JSON) -> None:
    raw(core(client).create_namespaced_pod, ns, body)


def read(client: kubernetes.client.ApiClient, ns: str, name: str) -> JSON:
    return raw(core(client).read_namespaced_pod, name, ns)


def states(obj: JSON) -> dict[str, JSON]:
    return {s["name"]: s["state"] for s in (obj.get("status") or {}).get("containerStatuses") or []}


def finished(client: kubernetes.client.ApiClient, ns: str, name: str) -> JSON:
    """The Pod once it is Succeeded or Failed."""
    return wait_for(lambda: (p := read(client, ns, name))["status"].get("phase") in ("Succeeded", "Failed") and p,
                    timeout=180, message=lambda: json.dumps(read(client, ns, name).get("status")))  # fmt: skip


def waiting(client: kubernetes.client.ApiClient, ns: str, name: str, container: str, reason: str) -> JSON:
    """The Pod once ``container`` waits with ``reason``."""

    def check() -> JSON | None:
        obj = read(client, ns, name)
        return obj if states(obj).get(container, {}).get("waiting", {}).get("reason") == reason else None

    return wait_for(check, timeout=120, message=lambda: json.dumps(read(client, ns, name).get("status")))


def log(cluster: LocalCluster, ns: str, name: str, container: str) -> str:
    return "".join(path.read_text() for path in cluster.pod_logs(ns, name, container))


def events(client: kubernetes.client.ApiClient, ns: str, name: str) -> list[tuple[str, str]]:
    listing = raw(core(client).list_namespaced_event, ns, field_selector=f"involvedObject.name={name}")
    return [(e["reason"], e["message"]) for e in listing["items"]]


def test_an_absent_image_waits_with_the_kubelets_reasons_and_the_operator_sees_them(
    client: kubernetes.client.ApiClient, ns: str
) -> None:
    create(client, ns, pod("never", {"name": "main", "image": ABSENT_IMAGE, "imagePullPolicy": "Never"}))
    create(client, ns, pod("pull", {"name": "main", "image": ABSENT_IMAGE, "imagePullPolicy": "IfNotPresent"}))

    never = waiting(client, ns, "never", "main", "ErrImageNeverPull")
    message = f'Container image "{ABSENT_IMAGE}" is not present with pull policy of Never'
    assert states(never)["main"]["waiting"]["message"] == message
    assert ("ErrImageNeverPull", message) in events(client, ns, "never")
    # The pull is tried (no registry answers), fails, and the kubelet's back-off follows.
    backing_off = waiting(client, ns, "pull", "main", "ImagePullBackOff")
    assert states(backing_off)["main"]["waiting"]["message"] == f'Back-off pulling image "{ABSENT_IMAGE}"'
    pull_events = events(client, ns, "pull")
    assert ("Failed", "Error: ErrImagePull") in pull_events
    assert ("Failed", "Error: ImagePullBackOff") in pull_events
    assert any(reason == "Failed" and text.startswith(f'Failed to pull image "{ABSENT_IMAGE}": ')
               for reason, text in pull_events)  # fmt: skip
    # What the operator's never-started detection reads off these Pods.
    for obj, reason in ((never, "ErrImageNeverPull"), (backing_off, "ImagePullBackOff")):
        report = pod_start.report([obj])
        assert not report.started and report.alive
        assert report.problem is not None and report.problem.startswith(f"{reason}: ")


def test_run_as_non_root_refuses_an_image_that_runs_as_root_and_admits_a_numeric_user(
    client: kubernetes.client.ApiClient, ns: str, test_image: str
) -> None:
    create(client, ns, pod(
        "nonroot",
        {"name": "rootimage", "image": BASE_IMAGE, "imagePullPolicy": "Never", "command": ["id", "-u"]},
        {"name": "userimage", "image": test_image, "imagePullPolicy": "Never", "args": ["id", "-u"]},
        securityContext={"runAsNonRoot": True},
    ))  # fmt: skip

    refused = waiting(client, ns, "nonroot", "rootimage", "CreateContainerConfigError")
    assert states(refused)["rootimage"]["waiting"]["message"].startswith(
        "container has runAsNonRoot and image will run as root (pod: "
    )

    def user_container_done() -> JSON | None:
        obj = read(client, ns, "nonroot")
        return obj if "terminated" in states(obj).get("userimage", {}) else None

    terminated = states(wait_for(user_container_done, timeout=120))["userimage"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (0, "Completed")


def test_a_container_runs_as_its_security_context_with_env_args_limits_and_volumes(
    podman_cluster: LocalCluster, client: kubernetes.client.ApiClient, ns: str, test_image: str
) -> None:
    script = """
        echo "uid=$(id -u) gid=$(id -g) groups=$(id -G) hostname=$(hostname)"
        echo "arg=$1 pwd=$(pwd)"
        touch /rootfs-probe 2>/dev/null && echo root-writable || echo root-read-only
        echo data > /tmp/probe && echo tmp-writable
        echo data > /cache/entry && echo "subpath=$(ls /tmp/cache)"
        stat -c 'tmp-group=%g' /tmp
        grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status | tr -d '\\t'
        cd /sys/fs/cgroup && echo "cpu-quota=$(cat cpu/cpu.cfs_quota_us) memory=$(cat memory/memory.limit_in_bytes)"
    """
    container = {
        "name": "main", "image": test_image, "imagePullPolicy": "Never",
        "command": ["sh", "-c", script, "sh", "$(GREETING)"], "workingDir": "/tmp",
        "env": [{"name": "NAME", "value": "world"}, {"name": "GREETING", "value": "hello $(NAME)"}],
        "securityContext": {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]}},
        "resources": {"limits": {"cpu": "500m", "memory": "128Mi"}},
        "volumeMounts": [{"name": "scratch", "mountPath": "/tmp"},
                         {"name": "scratch", "mountPath": "/cache", "subPath": "cache"}],
    }  # fmt: skip
    create(client, ns, pod(
        "secure", container, volumes=[{"name": "scratch", "emptyDir": {}}], automountServiceAccountToken=False,
        securityContext={"runAsUser": 10002, "runAsGroup": 10003, "fsGroup": 10004, "runAsNonRoot": True,
                         "seccompProfile": {"type": "RuntimeDefault"}},
    ))  # fmt: skip

    done = finished(client, ns, "secure")
    output = log(podman_cluster, ns, "secure", "main").splitlines()
    assert done["status"]["phase"] == "Succeeded", output
    assert output == [
        "uid=10002 gid=10003 groups=10003 10004 hostname=secure",
        "arg=hello world pwd=/tmp",
        "root-read-only",
        "tmp-writable",
        "subpath=entry",
        "tmp-group=10004",
        "CapEff:0000000000000000",
        "NoNewPrivs:1",
        "Seccomp:2",  # a filter: podman's default profile
        f"cpu-quota=50000 memory={128 * 1024 * 1024}",
    ]


def test_the_service_account_token_reaches_the_api_server_and_only_when_automounted(
    podman_cluster: LocalCluster, client: kubernetes.client.ApiClient, ns: str, test_image: str
) -> None:
    rbac: Any = kubernetes.client.RbacAuthorizationV1Api(client)
    rbac.create_namespaced_role(
        ns, {"metadata": {"name": "read-pods"}, "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]}
    )
    rbac.create_namespaced_role_binding(ns, {
        "metadata": {"name": "read-pods"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-pods"},
        "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": ns}]})  # fmt: skip
    # What the kubernetes client's in-cluster configuration does: https to the service address,
    # the mounted CA bundle, the bearer token.
    program = f"""
import base64, json, os, ssl, urllib.request
d = "{SA_DIR}"
token, namespace = open(d + "/token").read(), open(d + "/namespace").read()
url = "https://%s:%s/api/v1/namespaces/%s/pods/%s" % (
    os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"], namespace, os.environ["POD_NAME"])
request = urllib.request.Request(url, headers={{"Authorization": "Bearer " + token}})
me = json.load(urllib.request.urlopen(request, context=ssl.create_default_context(cafile=d + "/ca.crt")))
claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
print(json.dumps({{"uid": me["metadata"]["uid"], "sub": claims["sub"], "pod": claims["kubernetes.io"]["pod"]["name"]}}))
"""
    env = [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    create(client, ns, pod("mounted", {"name": "main", "image": test_image, "imagePullPolicy": "Never",
                                       "args": ["python", "-c", program], "env": env}))  # fmt: skip
    # Without the token, and with the volumes a Pod mounts its own configuration from.
    raw(core(client).create_namespaced_config_map, ns, {"metadata": {"name": "settings"}, "data": {"greeting": "hi"}})
    script = (f"ls {SA_DIR} 2>/dev/null || echo no-token; cat /etc/settings/greeting.txt; echo; "
              "stat -c %a /etc/settings/greeting.txt; cat /etc/creds/password; echo; "
              "touch /etc/settings/x 2>/dev/null || echo settings-read-only")  # fmt: skip
    greeting = {"key": "greeting", "path": "greeting.txt", "mode": 0o444}
    create(client, ns, pod(
        "unmounted",
        {"name": "main", "image": test_image, "imagePullPolicy": "Never", "args": ["sh", "-c", script],
         "volumeMounts": [{"name": "settings", "mountPath": "/etc/settings"},
                          {"name": "creds", "mountPath": "/etc/creds"}]},
        automountServiceAccountToken=False,
        volumes=[{"name": "settings", "configMap": {"name": "settings", "items": [greeting]}},
                 {"name": "creds", "secret": {"secretName": "creds"}}],
    ))  # fmt: skip

    # Its Secret does not exist yet: the kubelet's FailedMount, then the Pod runs once it does.
    def failed_mount() -> bool:
        return any(reason == "FailedMount" and 'secret "creds" not found' in text
                   for reason, text in events(client, ns, "unmounted"))  # fmt: skip

    wait_for(failed_mount, timeout=120)
    assert states(read(client, ns, "unmounted"))["main"] == {"waiting": {"reason": "ContainerCreating"}}
    raw(core(client).create_namespaced_secret, ns, {"metadata": {"name": "creds"}, "stringData": {"password": "pw"}})

    mounted = finished(client, ns, "mounted")
    output = log(podman_cluster, ns, "mounted", "main")
    assert mounted["status"]["phase"] == "Succeeded", output
    assert json.loads(output.splitlines()[-1]) == {
        "uid": mounted["metadata"]["uid"],
        "sub": f"system:serviceaccount:{ns}:default",
        "pod": "mounted",  # bound to the Pod (boundObjectRef)
    }
    unmounted = finished(client, ns, "unmounted")
    assert unmounted["status"]["phase"] == "Succeeded"
    assert log(podman_cluster, ns, "unmounted", "main").splitlines() == [
        "no-token",
        "hi",
        "444",
        "pw",
        "settings-read-only",
    ]


def test_exit_codes_and_the_oom_killer_give_the_kubelets_termination_reasons(
    client: kubernetes.client.ApiClient, ns: str, test_image: str
) -> None:
    def container(name: str, program: str, **extra: Any) -> JSON:
        return {"name": name, "image": test_image, "imagePullPolicy": "Never", "args": ["python", "-c", program],
                **extra}  # fmt: skip

    create(client, ns, pod(
        "exits",
        container("ok", "print('fine')"),
        container("fails", "open('/dev/termination-log', 'w').write('no such table'); raise SystemExit(3)"),
        container("hog", "x = bytearray(512 * 1024 * 1024); print('survived')",
                  resources={"limits": {"memory": "64Mi"}}),
        automountServiceAccountToken=False,
    ))  # fmt: skip

    done = finished(client, ns, "exits")
    assert done["status"]["phase"] == "Failed"
    reasons = {name: (s["terminated"]["exitCode"], s["terminated"]["reason"]) for name, s in states(done).items()}
    assert reasons == {"ok": (0, "Completed"), "fails": (3, "Error"), "hog": (137, "OOMKilled")}
    assert states(done)["fails"]["terminated"]["message"] == "no such table"  # its terminationMessagePath


def test_deletion_sends_sigterm_through_tini_then_sigkill_after_the_grace_period(
    podman_cluster: LocalCluster, client: kubernetes.client.ApiClient, ns: str, test_image: str
) -> None:
    def container(name: str, on_term: str) -> JSON:
        program = ("import signal, sys, time\n"
                   f"signal.signal(signal.SIGTERM, lambda *_: {on_term})\n"
                   "print('ready', flush=True)\n"
                   "for _ in range(600): time.sleep(1)\n")  # fmt: skip
        return {"name": name, "image": test_image, "imagePullPolicy": "Never", "args": ["python", "-c", program]}

    create(client, ns, pod(
        "stopping",
        container("polite", "sys.exit(0)"),
        container("stubborn", "print('ignoring SIGTERM', flush=True)"),
        terminationGracePeriodSeconds=3, automountServiceAccountToken=False,
    ))  # fmt: skip
    wait_for(lambda: all("ready" in log(podman_cluster, ns, "stopping", c) for c in ("polite", "stubborn")),
             timeout=120)  # fmt: skip

    watch = kubernetes.watch.Watch()
    stream = watch.stream(core(client).list_namespaced_pod, ns, field_selector="metadata.name=stopping",
                          timeout_seconds=120)  # fmt: skip
    core(client).delete_namespaced_pod("stopping", ns)
    last: Any = None
    for event in stream:
        last = event["object"]
        if event["type"] == "DELETED":
            watch.stop()
    assert last is not None and last.metadata.deletion_timestamp is not None
    exits = {s.name: s.state.terminated.exit_code for s in last.status.container_statuses}
    assert exits == {"polite": 0, "stubborn": 137}  # 137: SIGKILL once the grace period was over
    assert log(podman_cluster, ns, "stopping", "stubborn").splitlines() == ["ready", "ignoring SIGTERM"]
    listed = subprocess.run(["podman", "ps", "--all", "--quiet", "--filter", f"label=io.kubernetes.pod.namespace={ns}"],
                            capture_output=True, text=True, check=True, timeout=60)  # fmt: skip
    assert listed.stdout.split() == []  # removed once they exited


def test_a_job_completes_through_the_real_job_controller_in_a_locked_down_container(
    podman_cluster: LocalCluster, client: kubernetes.client.ApiClient, ns: str, test_image: str
) -> None:
    container = {
        "name": "chunk", "image": test_image, "imagePullPolicy": "IfNotPresent",
        "args": ["python", "-c", "import os; open('/tmp/out', 'w').write('x'); print('chunk done as', os.getuid())"],
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "scratch", "mountPath": "/tmp"}],
    }  # fmt: skip
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "chunk"},
           "spec": {"backoffLimit": 0, "template": {
        "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False, "containers": [container],
                 "volumes": [{"name": "scratch", "emptyDir": {}}],
                 "securityContext": {"runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                                     "seccompProfile": {"type": "RuntimeDefault"}}}}}}  # fmt: skip
    batch: Any = kubernetes.client.BatchV1Api(client)
    raw(batch.create_namespaced_job, ns, job)

    def complete() -> JSON | None:
        obj = raw(batch.read_namespaced_job, "chunk", ns)
        conditions = {c["type"]: c["status"] for c in obj.get("status", {}).get("conditions") or []}
        return obj if conditions.get("Complete") == "True" or conditions.get("Failed") == "True" else None

    done = wait_for(complete, timeout=180)
    assert done["status"].get("succeeded") == 1, done["status"]
    [job_pod] = raw(core(client).list_namespaced_pod, ns, label_selector="batch.kubernetes.io/job-name=chunk")["items"]
    assert log(podman_cluster, ns, job_pod["metadata"]["name"], "chunk").splitlines() == ["chunk done as 10001"]


def test_the_runtime_execs_in_a_running_container_and_reports_a_start_error(tmp_path: Path, test_image: str) -> None:
    runtime = PodmanRuntime(agent_id=f"test-{tmp_path.name}", seccomp_dir=tmp_path)

    def spec(name: str, command: list[str], args: list[str]) -> ContainerSpec:
        return ContainerSpec(pod_namespace="direct", pod_name="runtime", pod_uid=tmp_path.name, name=name,
                             image=test_image, command=command, args=args, env={}, working_dir=None,
                             log_path=tmp_path / f"{name}.log",
                             security=SecurityContext(run_as_user=10005))  # fmt: skip

    running = runtime.start(spec("sleeper", [], ["sh", "-c", "echo up; exec sleep 600"]))
    try:
        wait_for(lambda: "up" in (tmp_path / "sleeper.log").read_text(), timeout=120)
        assert running.exec(["sh", "-c", 'test "$(id -u)" = 10005'], timeout=60) == 0
        assert running.exec(["sh", "-c", "exit 4"], timeout=60) == 4
    finally:
        running.terminate()  # sleep as tini's child dies of SIGTERM
        code = wait_for(lambda: running.poll() is not None and running.poll(), timeout=120)
    assert (code, running.exit_reason()) == (143, None)

    broken = runtime.start(spec("broken", ["no-such-program"], []))  # replaces tini: runc cannot exec it
    code = wait_for(lambda: broken.poll() is not None and broken.poll(), timeout=120)
    reason = broken.exit_reason()
    assert code == 128 and reason is not None and reason[0] == "StartError", (code, reason)
    assert runtime.remove_leftovers() == []


def test_a_token_the_node_renews_replaces_the_file_a_running_container_reads(
    podman_cluster: LocalCluster, client: kubernetes.client.ApiClient, ns: str, test_image: str, tmp_path: Path
) -> None:
    """Renewal itself (the kubelet's at 80% of the lifetime) as the node does it, with the node's
    credentials against the real API server, for a real Pod bound to the node; the clock is the
    one thing moved forward, by `PodVolumes.refresh_tokens`' ``now``."""
    # Automounted: the Pod's spec then asks for the API server's audience, and a node may only
    # request tokens for audiences its Pods ask for (ServiceAccountNodeAudienceRestriction).
    create(client, ns, pod("holder", {"name": "main", "image": test_image, "imagePullPolicy": "Never",
                                      "args": ["sleep", "600"]}))  # fmt: skip
    bound = wait_for(lambda: (p := read(client, ns, "holder"))["status"].get("phase") == "Running" and p, timeout=120)
    kubeconfig, _ = podman_cluster.control_plane.node_credentials(podman_cluster.node_name)
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    runtime = PodmanRuntime(agent_id=f"test-{tmp_path.name}", seccomp_dir=tmp_path)
    with kubernetes.client.ApiClient(configuration) as node_api:
        agent = NodeAgent(node_api, AgentConfig(node_name=podman_cluster.node_name, state_dir=tmp_path), runtime)
        source = {"serviceAccountToken": {"path": "token", "expirationSeconds": 600}}
        holder = bound | {"spec": bound["spec"] | {"volumes": [{"name": "tokens", "projected": {"sources": [source]}}]}}
        volumes = PodVolumes(tmp_path / "pod", holder, read=agent.read_volume_source, field_value=str, all_types=True,
                             request_token=lambda n, a, aud, s: agent.request_token(holder, n, a, aud, s))  # fmt: skip
        before = time.monotonic()
        mounts, read_only = volumes.mounts({"volumeMounts": [{"name": "tokens", "mountPath": "/tokens"}]})
        first = (mounts["/tokens"] / "token").read_text()
        reader = runtime.start(ContainerSpec(
            pod_namespace=ns, pod_name="reader", pod_uid=tmp_path.name, name="reader", image=test_image, command=[],
            args=["sh", "-c", "while true; do cat /tokens/token; echo; sleep 0.2; done"], env={}, working_dir=None,
            volumes=mounts, read_only_mounts=read_only, log_path=tmp_path / "reader.log",
        ))  # fmt: skip
        try:
            wait_for(lambda: first in (tmp_path / "reader.log").read_text(), timeout=120)
            volumes.refresh_tokens(now=before + 479)  # before 80% of its 600 s: kept
            assert (mounts["/tokens"] / "token").read_text() == first
            volumes.refresh_tokens(now=time.monotonic() + 480)  # a new token (each has its own jti)
            renewed = (mounts["/tokens"] / "token").read_text()
            assert renewed != first
            wait_for(lambda: renewed in (tmp_path / "reader.log").read_text(), timeout=120)
        finally:
            reader.kill()
            reader.poll()
    review: Any = kubernetes.client.AuthenticationV1Api(client)
    status = review.create_token_review({"spec": {"token": renewed}}).status
    assert status.authenticated and status.user.username == f"system:serviceaccount:{ns}:default"
    assert status.user.extra["authentication.kubernetes.io/pod-name"] == ["holder"]
