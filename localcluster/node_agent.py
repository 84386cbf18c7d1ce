"""The node agent: plays the kubelet of one Node, and nothing else, against a real API server.

    python -m localcluster.node_agent --kubeconfig NODE.kubeconfig --state-dir DIR [--node-name N]

It logs in as ``system:node:<name>`` (so the Node authorizer and NodeRestriction apply to it as to a
kubelet), registers a Ready Node with the machine's capacity, renews its Lease in
``kube-node-lease`` and watches the Pods bound to it (list, then watch from the resourceVersion,
relisting on 410 Gone). For each Pod it does what a kubelet does:

- resolves ``env`` (values with ``$(VAR)`` expansion, ``secretKeyRef``, ``configMapKeyRef`` with
  ``optional``, ``fieldRef``) and ``envFrom``; what cannot be resolved leaves the container Waiting
  with reason ``CreateContainerConfigError`` and the kubelet's message, retried until it resolves;
- runs each container through a `localcluster.runtime.ContainerRuntime` (here: host processes) with
  its output in ``<state>/pods/<namespace>_<pod>_<uid>/<container>/<restartCount>.log``, and one
  host directory per ``emptyDir`` volume;
- writes the Pod's status: phase, the conditions (PodReadyToStartContainers, Initialized,
  ContainersReady, Ready; PodScheduled stays the scheduler's), ``startTime``, ``hostIP``/``podIP``
  (the node's loopback address: containers share the host's network) and ``containerStatuses``
  (waiting / running / terminated with exit code, reason Completed or Error, timestamps,
  ``restartCount``, ``lastState``);
- honours ``restartPolicy`` (Never; OnFailure and Always with the kubelet's doubling back-off);
- ``activeDeadlineSeconds``: kills the Pod and fails it with reason ``DeadlineExceeded``;
- on deletion (``deletionTimestamp``): SIGTERM, up to the deletion's grace period, SIGKILL, final
  status, then deletes the Pod with grace period 0, which completes a graceful deletion;
- plays the containers' startup, liveness and readiness probes (`localcluster.probes`): readiness
  drives the container's ``ready`` and the Pod's ContainersReady/Ready, a startup probe gates the
  other two, and a startup or liveness probe reaching its ``failureThreshold`` stops the container
  (SIGTERM, SIGKILL after the grace period), which is then restarted per ``restartPolicy``;
- posts the kubelet's Events on the Pod (Started, Killing, Failed, BackOff, Unhealthy);
- with ``--tls-cert-file``, ``--tls-private-key-file`` and ``--client-ca-file``, serves the
  kubelet's HTTPS API on 127.0.0.1 (`localcluster.kubelet_api`: ``/containerLogs``, so ``kubectl
  logs`` works through the API server) and reports its port in the Node's
  ``status.daemonEndpoints``; requests are authorized with SubjectAccessReviews, as a kubelet with
  ``--authorization-mode=Webhook`` does.

Not played: init containers (reported as CreateContainerError), ``grpc`` probes (they fail), volumes
other than emptyDir (ignored), resource limits, ``terminationMessagePath`` (only
``FallbackToLogsOnError`` yields a message), node-pressure eviction, static Pods. A container that
was running when the agent stopped is reported ``ContainerStatusUnknown`` when it comes back, as a
kubelet reports a container that vanished.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import json
import logging
import os
import platform
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes.client
import kubernetes.config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from localcluster.kubelet_api import Attributes, ContainerLog, KubeletServer, LogError, User
from localcluster.probes import ContainerProber, ProbeState, run_probe
from localcluster.runtime import (
    ContainerError,
    ContainerRuntime,
    ContainerSpec,
    HostProcessRuntime,
    RunningContainer,
    expand,
)

logger = logging.getLogger("localcluster.node_agent")

JSON = dict[str, Any]
NODE_IP = "127.0.0.1"
LEASE_NAMESPACE = "kube-node-lease"
MANAGED_CONDITIONS = ("PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready")
TERMINAL_PHASES = ("Succeeded", "Failed")
MAX_BACKOFF_SECONDS = 300.0  # the kubelet's cap on CrashLoopBackOff
# The kubelet's --authorization-webhook-cache-authorized-ttl and -unauthorized-ttl defaults.
AUTHORIZED_TTL_SECONDS = 300.0
UNAUTHORIZED_TTL_SECONDS = 30.0


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: str) -> float:
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


class ConfigError(Exception):
    """The container's configuration cannot be resolved yet (kubelet: CreateContainerConfigError)."""


@dataclass(frozen=True)
class AgentConfig:
    node_name: str
    state_dir: Path
    cpu: str = str(os.cpu_count() or 1)
    memory: str = ""  # default: the machine's MemTotal
    max_pods: int = 110
    lease_duration_seconds: int = 40
    lease_renew_seconds: float = 10.0
    node_status_report_seconds: float = 60.0
    config_retry_seconds: float = 2.0  # how soon an unresolvable Secret/ConfigMap is tried again
    restart_backoff_seconds: float = 10.0  # the kubelet's initial CrashLoopBackOff
    watch_timeout_seconds: int = 300
    # The kubelet API (serving certificate, key, the CA its clients' certificates must come from);
    # without them the Node reports port 0 and nothing is served.
    tls_cert_file: Path | None = None
    tls_private_key_file: Path | None = None
    client_ca_file: Path | None = None
    kubelet_port: int = 0  # 0: a free port


def machine_memory() -> str:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return f"{int(line.split()[1])}Ki"
    return "4Gi"


@dataclass
class Container:
    """What the agent knows about one container of a Pod."""

    spec: JSON
    restart_count: int = 0
    state: JSON = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: JSON = field(default_factory=dict)
    handle: RunningContainer | None = None
    container_id: str | None = None
    next_start: float = 0.0  # monotonic time before which it is not (re)started
    done: bool = False  # terminated and not to be restarted
    prober: ContainerProber | None = None  # the running instance's probes
    kill_deadline: float | None = None  # a failed probe stopped it: SIGKILL at this monotonic time

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def started(self) -> bool:
        return "running" in self.state and (self.prober is None or self.prober.started)

    @property
    def ready(self) -> bool:
        return self.started and self.kill_deadline is None and (self.prober is None or self.prober.ready)

    def status(self) -> JSON:
        status: JSON = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "",
            "ready": self.ready,
            "started": self.started,
            "restartCount": self.restart_count,
            "state": self.state,
            "lastState": self.last_state,
        }
        if self.container_id:
            status["containerID"] = self.container_id
        return status


class PodWorker:
    """Runs one Pod to its end in a thread; the watch feeds it the Pod's latest version."""

    def __init__(self, agent: NodeAgent, pod: JSON) -> None:
        self.agent = agent
        self.uid = str(pod["metadata"]["uid"])
        self.namespace = str(pod["metadata"]["namespace"])
        self.name = str(pod["metadata"]["name"])
        self._pod = pod
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self.gone = False  # the API object is gone (force deletion, namespace purge)
        self.finished = False
        spec = pod.get("spec") or {}
        self.containers = [Container(c) for c in spec.get("containers") or []]
        self.restart_policy = str(spec.get("restartPolicy") or "Always")
        self.pod_dir = agent.config.state_dir / "pods" / f"{self.namespace}_{self.name}_{self.uid}"
        self.thread = threading.Thread(target=self._run, name=f"pod-{self.namespace}/{self.name}", daemon=True)
        self._last_written: JSON | None = None
        self._start_time: str | None = None
        self._phase = "Pending"
        self._pod_reason: str | None = None
        self._pod_message: str | None = None
        self._conditions: dict[str, JSON] = {}

    # -- inputs from the watch ----------------------------------------------------------------------

    def update(self, pod: JSON) -> None:
        with self._lock:
            self._pod = pod
        self._changed.set()

    def vanished(self) -> None:
        self.gone = True
        self._changed.set()

    @property
    def pod(self) -> JSON:
        with self._lock:
            return self._pod

    def deletion_requested(self) -> bool:
        return self.gone or bool(self.pod["metadata"].get("deletionTimestamp"))

    # -- the Pod's life -----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._live()
        except Exception:
            logger.exception("pod %s/%s: the worker failed", self.namespace, self.name)
            for container in self.containers:
                if container.handle is not None:
                    container.handle.kill()
        finally:
            self.finished = True
            self.agent.worker_finished(self)

    def _live(self) -> None:
        status = self.pod.get("status") or {}
        self._start_time = status.get("startTime") or now()
        self._adopt_previous_statuses(status)
        spec = self.pod.get("spec") or {}
        if spec.get("initContainers"):
            for container in self.containers:
                message = "init containers are not supported by this node agent"
                container.state = {"waiting": {"reason": "CreateContainerError", "message": message}}
        self._write_status()
        deadline_seconds = spec.get("activeDeadlineSeconds")
        deadline = None if deadline_seconds is None else parse_time(self._start_time) + float(deadline_seconds)
        while True:
            if self.deletion_requested():
                self._terminate(self._deletion_grace(), reason="Killing", message="Stopping container")
                self._finish_terminal(deleted=True)
                return
            if deadline is not None and time.time() >= deadline:
                self._terminate(self._grace_seconds(), reason="Killing", message="Stopping container")
                self._phase = "Failed"
                self._pod_reason = "DeadlineExceeded"
                self._pod_message = "Pod was active on the node longer than the specified deadline"
                self._write_status()
                self.agent.event(self.pod, "Warning", "DeadlineExceeded", self._pod_message)
                return
            if not spec.get("initContainers"):
                self._step()
            if all(c.done for c in self.containers):
                self._finish_terminal(deleted=False)
                return
            self._write_status()
            self._changed.wait(0.1)
            self._changed.clear()

    def _adopt_previous_statuses(self, status: JSON) -> None:
        """Containers that ran under an earlier agent process are gone: report them as a kubelet does."""
        previous = {s.get("name"): s for s in status.get("containerStatuses") or []}
        for container in self.containers:
            old = previous.get(container.name) or {}
            container.restart_count = int(old.get("restartCount") or 0)
            state = old.get("state") or {}
            if "running" in state:
                state = {"terminated": {
                    "exitCode": 137, "reason": "ContainerStatusUnknown",
                    "message": "The container could not be located when the pod was terminated",
                    "startedAt": state["running"].get("startedAt"), "finishedAt": now()}}  # fmt: skip
            if "terminated" in state:
                container.state = state
                self._container_exited(container, int(state["terminated"].get("exitCode") or 0))

    def _step(self) -> None:
        for container in self.containers:
            if container.handle is not None:
                code = container.handle.poll()
                if code is not None:
                    self._record_exit(container, code)
                else:
                    self._probe(container, container.handle)
            elif not container.done and time.monotonic() >= container.next_start:
                self._start_container(container)
                if container.handle is not None:
                    container.kill_deadline = None
                    container.prober = ContainerProber.for_container(
                        container.spec, container.restart_count, time.monotonic()
                    )

    def _probe(self, container: Container, handle: RunningContainer) -> None:
        """Collect finished probes, start due ones, stop the container once one says it must go."""
        if container.kill_deadline is not None:
            if time.monotonic() >= container.kill_deadline:
                handle.kill()
            return
        prober = container.prober
        if prober is None:
            return
        for probe in prober.active():
            if probe.pending is not None and probe.pending.done():
                passed, output = probe.pending.result()
                probe.pending = None
                if not passed:
                    message = f"{probe.kind} probe failed: {output}"
                    self.agent.event(self.pod, "Warning", "Unhealthy", message, container.name)
                probe.record(passed)
            if probe.pending is None and time.monotonic() >= probe.next_due:
                probe.next_due = time.monotonic() + probe.period
                probe.pending = self.agent.submit_probe(probe, container.spec, handle, self._changed.set)
        failed = prober.failed()
        if failed is not None:
            self._stop_unhealthy(container, handle, failed)

    def _stop_unhealthy(self, container: Container, handle: RunningContainer, probe: ProbeState) -> None:
        """The kubelet's kill for a failed startup/liveness probe; `_step` restarts it per restartPolicy."""
        restarts = "will be restarted" if self.restart_policy != "Never" else "will not be restarted"
        message = f"Container {container.name} failed {probe.kind.lower()} probe, {restarts}"
        self.agent.event(self.pod, "Normal", "Killing", message, container.name)
        grace = probe.spec.get("terminationGracePeriodSeconds")
        container.kill_deadline = time.monotonic() + (self._grace_seconds() if grace is None else float(grace))
        handle.terminate()

    def _start_container(self, container: Container) -> None:
        try:
            env = self.agent.resolve_env(self.pod, container.spec)
        except ConfigError as e:
            message = str(e)
            if container.state.get("waiting", {}).get("message") != message:
                self.agent.event(self.pod, "Warning", "Failed", f"Error: {message}", container.name)
            container.state = {"waiting": {"reason": "CreateContainerConfigError", "message": message}}
            container.next_start = time.monotonic() + self.agent.config.config_retry_seconds
            return
        volumes = self._volumes(container.spec)
        log_path = self.pod_dir / container.name / f"{container.restart_count}.log"
        spec = ContainerSpec(
            pod_namespace=self.namespace,
            pod_name=self.name,
            pod_uid=self.uid,
            name=container.name,
            image=str(container.spec.get("image") or ""),
            command=[str(a) for a in container.spec.get("command") or []],
            args=[str(a) for a in container.spec.get("args") or []],
            env=env,
            working_dir=container.spec.get("workingDir"),
            volumes=volumes,
            log_path=log_path,
        )
        try:
            container.handle = self.agent.runtime.start(spec)
        except ContainerError as e:  # retried, as the kubelet retries CreateContainerError
            container.state = {"waiting": {"reason": "CreateContainerError", "message": str(e)}}
            self.agent.event(self.pod, "Warning", "Failed", f"Error: {e}", container.name)
            container.next_start = time.monotonic() + self.agent.config.config_retry_seconds
            return
        container.container_id = container.handle.id
        container.state = {"running": {"startedAt": now()}}
        if self._phase == "Pending":
            self._phase = "Running"
        self.agent.event(self.pod, "Normal", "Started", f"Started container {container.name}", container.name)

    def _volumes(self, container_spec: JSON) -> dict[str, Path]:
        volumes = {v.get("name"): v for v in (self.pod.get("spec") or {}).get("volumes") or []}
        mounts: dict[str, Path] = {}
        for mount in container_spec.get("volumeMounts") or []:
            volume = volumes.get(mount.get("name"))
            if volume is not None and "emptyDir" in volume:
                host_dir = self.pod_dir / "volumes" / str(volume["name"])
                host_dir.mkdir(parents=True, exist_ok=True)
                mounts[str(mount["mountPath"]).rstrip("/") or "/"] = host_dir
        return mounts

    def _record_exit(self, container: Container, code: int) -> None:
        started_at = (container.state.get("running") or {}).get("startedAt") or now()
        terminated: JSON = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": started_at,
            "finishedAt": now(),
            "containerID": container.container_id,
        }
        if code != 0 and container.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            terminated["message"] = self._log_tail(container)
        container.handle = None
        container.state = {"terminated": terminated}
        self._container_exited(container, code)

    def _container_exited(self, container: Container, code: int) -> None:
        restart = self.restart_policy == "Always" or (self.restart_policy == "OnFailure" and code != 0)
        if not restart or self.deletion_requested():
            container.done = True
            return
        # The kubelet restarts at once after the first exit, then backs off 10 s, 20 s, ... 5 min.
        delay = 0.0 if container.restart_count == 0 else min(
            self.agent.config.restart_backoff_seconds * 2 ** (container.restart_count - 1), MAX_BACKOFF_SECONDS
        )  # fmt: skip
        if "terminated" in container.state:
            container.last_state = container.state
        container.restart_count += 1
        container.next_start = time.monotonic() + delay
        if delay:
            pod = f"{self.name}_{self.namespace}({self.uid})"
            message = f"back-off {delay:.0f}s restarting failed container={container.name} pod={pod}"
            container.state = {"waiting": {"reason": "CrashLoopBackOff", "message": message}}
            self.agent.event(self.pod, "Warning", "BackOff", "Back-off restarting failed container", container.name)

    def _log_tail(self, container: Container, lines: int = 80, limit: int = 2048) -> str:
        path = self.pod_dir / container.name / f"{container.restart_count}.log"
        try:
            text = "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
        return text[-limit:]

    def _grace_seconds(self) -> float:
        return float((self.pod.get("spec") or {}).get("terminationGracePeriodSeconds", 30))

    def _deletion_grace(self) -> float:
        if self.gone:
            return 0.0
        grace = self.pod["metadata"].get("deletionGracePeriodSeconds")
        return self._grace_seconds() if grace is None else float(grace)

    def _terminate(self, grace: float, *, reason: str, message: str) -> None:
        """SIGTERM every running container, SIGKILL what is left after ``grace`` seconds."""
        running = [c for c in self.containers if c.handle is not None]
        for container in running:
            self.agent.event(self.pod, "Normal", reason, message, container.name)
            assert container.handle is not None
            container.handle.terminate()
        deadline = time.monotonic() + grace
        while any(c.handle is not None and c.handle.poll() is None for c in running):
            if time.monotonic() >= deadline or self.gone:
                for container in running:
                    if container.handle is not None:
                        container.handle.kill()
                break
            self._changed.wait(0.05)
            self._changed.clear()
        for container in running:
            handle = container.handle
            if handle is None:
                continue
            code = handle.poll()
            while code is None:
                handle.kill()
                time.sleep(0.01)
                code = handle.poll()
            self._record_exit(container, code)
        for container in self.containers:  # never started, or backing off: not started again
            container.done = True

    def _finish_terminal(self, *, deleted: bool) -> None:
        """Terminal phase and final status; for a deleted Pod, complete the deletion (grace 0)."""
        exit_codes = [int(c.state["terminated"]["exitCode"]) for c in self.containers if "terminated" in c.state]
        all_succeeded = len(exit_codes) == len(self.containers) and all(code == 0 for code in exit_codes)
        self._phase = "Succeeded" if all_succeeded else "Failed"
        if not self.gone:
            self._write_status()
        if deleted and not self.gone:
            self.agent.complete_deletion(self.pod)

    # -- status ---------------------------------------------------------------------------------------

    def _condition(self, kind: str, status: bool, reason: str | None = None) -> JSON:
        value = "True" if status else "False"
        previous = self._conditions.get(kind)
        transition = previous["lastTransitionTime"] if previous and previous["status"] == value else now()
        condition: JSON = {"type": kind, "status": value, "lastProbeTime": None, "lastTransitionTime": transition}
        if reason:
            condition["reason"] = reason
        self._conditions[kind] = condition
        return condition

    def _status(self) -> JSON:
        terminal = self._phase in TERMINAL_PHASES
        ready = not terminal and bool(self.containers) and all(c.ready for c in self.containers)
        not_ready_reason = "PodCompleted" if terminal else "ContainersNotReady"
        ours = [
            self._condition("PodReadyToStartContainers", not terminal),
            self._condition("Initialized", True),
            self._condition("ContainersReady", ready, None if ready else not_ready_reason),
            self._condition("Ready", ready, None if ready else not_ready_reason),
        ]
        others = [
            c for c in (self.pod.get("status") or {}).get("conditions") or [] if c.get("type") not in MANAGED_CONDITIONS
        ]
        status: JSON = {
            "phase": self._phase,
            "conditions": others + ours,
            "hostIP": NODE_IP,
            "hostIPs": [{"ip": NODE_IP}],
            "podIP": NODE_IP,
            "podIPs": [{"ip": NODE_IP}],
            "startTime": self._start_time,
            "containerStatuses": [c.status() for c in self.containers],
            "reason": self._pod_reason,
            "message": self._pod_message,
        }
        return status

    def _write_status(self) -> None:
        status = self._status()
        comparable = json.dumps(status, sort_keys=True)
        if self._last_written is not None and json.dumps(self._last_written, sort_keys=True) == comparable:
            return
        if self.agent.patch_pod_status(self.namespace, self.name, self.uid, status):
            self._last_written = status
        else:
            self.gone = True


class NodeAgent:
    """Registers the Node, keeps it alive and runs the Pods bound to it (see the module docstring)."""

    def __init__(self, api: kubernetes.client.ApiClient, config: AgentConfig, runtime: ContainerRuntime) -> None:
        self.api = api
        self.config = config
        self.runtime = runtime
        # Any: the calls below ask for raw JSON (_preload_content=False), not the typed models.
        self.core: Any = kubernetes.client.CoreV1Api(api)
        self.coordination: Any = kubernetes.client.CoordinationV1Api(api)
        self.authorization: Any = kubernetes.client.AuthorizationV1Api(api)
        self.workers: dict[str, PodWorker] = {}
        self.pods_by_name: dict[tuple[str, str], JSON] = {}  # (namespace, name) -> the Pod last seen
        self.finished_uids: set[str] = set()
        self._deletions: set[str] = set()  # uids whose final delete (grace 0) was sent
        self._deletions_lock = threading.Lock()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._deleter = ThreadPoolExecutor(max_workers=4, thread_name_prefix="pod-delete")
        self._prober = ThreadPoolExecutor(max_workers=8, thread_name_prefix="probe")
        self._node_uid: str | None = None
        self._boot_id = str(uuid.uuid4())
        self._authorizations: dict[tuple[User, Attributes], tuple[float, bool, str]] = {}
        self.kubelet_server: KubeletServer | None = None
        if config.tls_cert_file and config.tls_private_key_file and config.client_ca_file:
            self.kubelet_server = KubeletServer(
                node_name=config.node_name,
                cert_file=config.tls_cert_file,
                key_file=config.tls_private_key_file,
                client_ca_file=config.client_ca_file,
                authorize=self.authorize,
                logs=self,
                host=NODE_IP,
                port=config.kubelet_port,
            )

    # -- API helpers ----------------------------------------------------------------------------------

    def _json(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> JSON:
        response = call(*args, _preload_content=False, **kwargs)
        try:
            data: JSON = json.loads(response.data or b"{}")
        finally:
            response.release_conn()
        return data

    def patch_pod_status(self, namespace: str, name: str, uid: str, status: JSON) -> bool:
        """Merge-patch the Pod's status (lists replaced whole); False once the Pod is gone."""
        body = {"metadata": {"uid": uid}, "status": status}  # uid: never write a namesake's status
        try:
            self._json(self.core.patch_namespaced_pod_status, name, namespace, body,
                       _content_type="application/merge-patch+json")  # fmt: skip
        except ApiException as e:
            if e.status in (404, 409):
                return False
            raise
        return True

    def delete_pod(self, pod: JSON) -> None:
        meta = pod["metadata"]
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}}
        try:
            self._json(self.core.delete_namespaced_pod, meta["name"], meta["namespace"], body=body)
        except ApiException as e:
            if e.status not in (404, 409):
                logger.warning("deleting pod %s/%s failed: %s", meta["namespace"], meta["name"], e.reason)

    def event(self, pod: JSON, kind: str, reason: str, message: str, container: str | None = None) -> None:
        meta = pod["metadata"]
        stamp = now()
        involved: JSON = {"kind": "Pod", "apiVersion": "v1", "namespace": meta["namespace"], "name": meta["name"],
                          "uid": meta["uid"], "resourceVersion": meta.get("resourceVersion")}  # fmt: skip
        if container:
            involved["fieldPath"] = f"spec.containers{{{container}}}"
        body = {
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
            "involvedObject": involved,
            "reason": reason,
            "message": message,
            "type": kind,
            "source": {"component": "kubelet", "host": self.config.node_name},
            "reportingComponent": "kubelet",
            "reportingInstance": self.config.node_name,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            self._json(self.core.create_namespaced_event, meta["namespace"], body)
        except ApiException as e:  # an Event is best effort, as in the kubelet
            logger.debug("event %s on %s/%s not posted: %s", reason, meta["namespace"], meta["name"], e.reason)

    def submit_probe(
        self, probe: ProbeState, container: JSON, handle: RunningContainer, done: Callable[[], None]
    ) -> Future[tuple[bool, str]]:
        """Run one probe in the probe threads (the Pod loop never waits on it); ``done()`` when it ends."""
        future = self._prober.submit(run_probe, probe, container, handle)
        future.add_done_callback(lambda _: done())
        return future

    # -- the kubelet API -----------------------------------------------------------------------------

    def authorize(self, user: User, attributes: Attributes) -> tuple[bool, str]:
        """A SubjectAccessReview, as the kubelet's webhook authorizer asks it (and caches the answer)."""
        key = (user, attributes)
        cached = self._authorizations.get(key)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1], cached[2]
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": user.name,
                "groups": list(user.groups),
                "resourceAttributes": {"verb": attributes.verb, "version": "v1", "resource": attributes.resource,
                                       "subresource": attributes.subresource, "name": attributes.name},
            },
        }  # fmt: skip
        status = self._json(self.authorization.create_subject_access_review, review).get("status") or {}
        allowed, reason = bool(status.get("allowed")), str(status.get("reason") or "")
        ttl = AUTHORIZED_TTL_SECONDS if allowed else UNAUTHORIZED_TTL_SECONDS
        self._authorizations[key] = (time.monotonic() + ttl, allowed, reason)
        return allowed, reason

    def container_log(self, namespace: str, pod: str, container: str, *, previous: bool) -> ContainerLog:
        """The log file of the container's latest (or, with ``previous``, the one before) instance."""
        with self._lock:
            obj = self.pods_by_name.get((namespace, pod))
            worker = None if obj is None else self.workers.get(str(obj["metadata"]["uid"]))
        if obj is None:
            raise LogError(404, f"pod {pod!r} does not exist".replace("'", '"'))
        names = [str(c.get("name")) for c in (obj.get("spec") or {}).get("containers") or []]
        if container not in names:
            raise LogError(404, f'container "{container}" not found in pod "{pod}"')
        uid = str(obj["metadata"]["uid"])
        directory = self.config.state_dir / "pods" / f"{namespace}_{pod}_{uid}" / container
        instances = sorted(int(f.stem) for f in directory.glob("*.log") if f.stem.isdigit())
        if previous:
            if len(instances) < 2:
                raise LogError(400, f'previous terminated container "{container}" in pod "{pod}" not found')
            return ContainerLog(directory / f"{instances[-2]}.log", lambda: False)
        if not instances:
            raise LogError(400, f'container "{container}" in pod "{pod}" is waiting to start: ContainerCreating')
        latest = instances[-1]
        state = None if worker is None else next(c for c in worker.containers if c.name == container)

        def still_running() -> bool:
            return (
                state is not None and not worker.finished  # type: ignore[union-attr]
                and state.handle is not None and state.restart_count == latest
            )  # fmt: skip

        return ContainerLog(directory / f"{latest}.log", still_running)

    # -- environment ---------------------------------------------------------------------------------

    def _read(self, kind: str, namespace: str, name: str, optional: bool) -> dict[str, str] | None:
        read = self.core.read_namespaced_secret if kind == "Secret" else self.core.read_namespaced_config_map
        try:
            obj = self._json(read, name, namespace)
        except ApiException as e:
            if e.status == 404:
                if optional:
                    return None
                raise ConfigError(f'{kind.lower()} "{name}" not found') from e
            # The Node authorizer learns of a Pod's references a moment after the Pod is bound.
            raise ConfigError(f"failed to read {kind.lower()} {namespace}/{name}: {e.reason}") from e
        if kind == "Secret":
            return {k: base64.b64decode(v).decode("utf-8", "replace") for k, v in (obj.get("data") or {}).items()}
        return {str(k): str(v) for k, v in (obj.get("data") or {}).items()}

    def resolve_env(self, pod: JSON, container: JSON) -> dict[str, str]:
        """The container's environment as the kubelet builds it (``envFrom`` first, then ``env``)."""
        namespace = pod["metadata"]["namespace"]
        env: dict[str, str] = {}
        cache: dict[tuple[str, str], dict[str, str] | None] = {}

        def source(kind: str, name: str, optional: bool) -> dict[str, str] | None:
            if (kind, name) not in cache:
                cache[(kind, name)] = self._read(kind, namespace, name, optional)
            return cache[(kind, name)]

        for item in container.get("envFrom") or []:
            ref, kind = (
                (item["secretRef"], "Secret") if "secretRef" in item else (item.get("configMapRef"), "ConfigMap")
            )
            if not ref:
                continue
            values = source(kind, ref["name"], bool(ref.get("optional")))
            prefix = item.get("prefix") or ""
            env.update({prefix + k: v for k, v in (values or {}).items()})
        for item in container.get("env") or []:
            name = item["name"]
            if item.get("value"):
                env[name] = expand(str(item["value"]), env)
                continue
            value_from = item.get("valueFrom")
            if not value_from:
                env[name] = ""
                continue
            if "fieldRef" in value_from:
                env[name] = self._field(pod, value_from["fieldRef"].get("fieldPath", ""))
                continue
            ref_key = "secretKeyRef" if "secretKeyRef" in value_from else "configMapKeyRef"
            ref = value_from.get(ref_key)
            if not ref:
                continue
            kind = "Secret" if ref_key == "secretKeyRef" else "ConfigMap"
            optional = bool(ref.get("optional"))
            values = source(kind, ref["name"], optional)
            if values is None:
                continue
            if ref["key"] not in values:
                if optional:
                    continue
                raise ConfigError(f"couldn't find key {ref['key']} in {kind} {namespace}/{ref['name']}")
            env[name] = values[ref["key"]]
        return env

    def _field(self, pod: JSON, path: str) -> str:
        meta = pod["metadata"]
        spec = pod.get("spec") or {}
        fields = {
            "metadata.name": meta.get("name"),
            "metadata.namespace": meta.get("namespace"),
            "metadata.uid": meta.get("uid"),
            "spec.nodeName": spec.get("nodeName"),
            "spec.serviceAccountName": spec.get("serviceAccountName"),
            "status.hostIP": NODE_IP,
            "status.podIP": NODE_IP,
        }
        if path.startswith("metadata.labels['") or path.startswith("metadata.annotations['"):
            group, _, key = path.partition("['")
            return str((meta.get(group.split(".")[1]) or {}).get(key.rstrip("']"), ""))
        return str(fields.get(path) or "")

    # -- the Node ------------------------------------------------------------------------------------

    @property
    def kubelet_port(self) -> int:
        return 0 if self.kubelet_server is None else self.kubelet_server.port

    def _node_status(self) -> JSON:
        stamp = now()
        ready = {"type": "Ready", "status": "True", "reason": "KubeletReady",
                 "message": "node agent is posting ready status", "lastHeartbeatTime": stamp}  # fmt: skip
        pressure = [
            {"type": kind, "status": "False", "reason": f"KubeletHas{text}", "message": f"node agent has {text}",
             "lastHeartbeatTime": stamp}
            for kind, text in (("MemoryPressure", "SufficientMemory"), ("DiskPressure", "NoDiskPressure"),
                               ("PIDPressure", "SufficientPID"))
        ]  # fmt: skip
        disk = shutil.disk_usage(self.config.state_dir)
        capacity = {
            "cpu": self.config.cpu,
            "memory": self.config.memory or machine_memory(),
            "pods": str(self.config.max_pods),
            "ephemeral-storage": f"{disk.total // 1024}Ki",
        }
        uname = platform.uname()
        return {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [*pressure, ready],
            "addresses": [
                {"type": "InternalIP", "address": NODE_IP},
                {"type": "Hostname", "address": self.config.node_name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.kubelet_port}},
            "nodeInfo": {
                "machineID": "", "systemUUID": "", "bootID": self._boot_id,
                "kernelVersion": uname.release, "osImage": "localcluster node agent",
                "containerRuntimeVersion": f"{self.runtime.name}://localcluster",
                "kubeletVersion": "v1.34.4", "kubeProxyVersion": "", "operatingSystem": "linux",
                "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(uname.machine, uname.machine),
            },
        }  # fmt: skip

    def register(self) -> None:
        name = self.config.node_name
        arch = self._node_status()["nodeInfo"]["architecture"]
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                                                  "kubernetes.io/arch": arch}},
            "status": self._node_status(),
        }  # fmt: skip
        try:
            node = self._json(self.core.create_node, body)
        except ApiException as e:
            if e.status != 409:
                raise
            node = self._json(self.core.read_node, name)
        self._node_uid = node["metadata"]["uid"]
        self._report_node_status()
        self._renew_lease()

    def _report_node_status(self) -> None:
        self._json(self.core.patch_node_status, self.config.node_name, {"status": self._node_status()},
                   _content_type="application/merge-patch+json")  # fmt: skip

    def _renew_lease(self) -> None:
        name = self.config.node_name
        spec = {"holderIdentity": name, "leaseDurationSeconds": self.config.lease_duration_seconds,
                "renewTime": now_micro()}  # fmt: skip
        try:
            lease = self._json(self.coordination.read_namespaced_lease, name, LEASE_NAMESPACE)
        except ApiException as e:
            if e.status != 404:
                raise
            owner = {"apiVersion": "v1", "kind": "Node", "name": name, "uid": self._node_uid}
            body = {"metadata": {"name": name, "namespace": LEASE_NAMESPACE, "ownerReferences": [owner]}, "spec": spec}
            self._json(self.coordination.create_namespaced_lease, LEASE_NAMESPACE, body)
            return
        lease["spec"] = (lease.get("spec") or {}) | spec
        self._json(self.coordination.replace_namespaced_lease, name, LEASE_NAMESPACE, lease)

    def _heartbeat(self) -> None:
        last_report = time.monotonic()
        while not self._stop.wait(self.config.lease_renew_seconds):
            try:
                self._renew_lease()
                if time.monotonic() - last_report >= self.config.node_status_report_seconds:
                    self._report_node_status()
                    last_report = time.monotonic()
            except Exception:
                logger.exception("node heartbeat failed")

    # -- Pods ------------------------------------------------------------------------------------------

    def worker_finished(self, worker: PodWorker) -> None:
        with self._lock:
            self.finished_uids.add(worker.uid)
            self.workers.pop(worker.uid, None)
        # A deletion that arrived while the worker wrote its terminal status is completed here.
        pod = worker.pod
        if pod["metadata"].get("deletionTimestamp") and not worker.gone:
            self.complete_deletion(pod)

    def complete_deletion(self, pod: JSON) -> None:
        """Once per Pod, however many updates its deletion brings (finalizers being removed...)."""
        uid = str(pod["metadata"]["uid"])
        with self._deletions_lock:
            if uid in self._deletions:
                return
            self._deletions.add(uid)
        self._deleter.submit(self.delete_pod, pod)

    def _handle(self, kind: str, pod: JSON) -> None:
        uid = str(pod["metadata"]["uid"])
        key = (str(pod["metadata"]["namespace"]), str(pod["metadata"]["name"]))
        with self._lock:
            worker = self.workers.get(uid)
            known = self.pods_by_name.get(key)
            if kind != "DELETED":
                self.pods_by_name[key] = pod
            elif known is not None and known["metadata"]["uid"] == uid:
                del self.pods_by_name[key]
            if kind == "DELETED":
                if worker is not None:
                    worker.vanished()
                self.finished_uids.discard(uid)
                with self._deletions_lock:
                    self._deletions.discard(uid)
                return
            if worker is not None:
                worker.update(pod)
                return
            phase = (pod.get("status") or {}).get("phase")
            if uid in self.finished_uids or phase in TERMINAL_PHASES:
                if pod["metadata"].get("deletionTimestamp"):
                    self.complete_deletion(pod)
                return
            worker = PodWorker(self, pod)
            self.workers[uid] = worker
        worker.thread.start()

    def _list(self) -> str:
        listing = self._json(
            self.core.list_pod_for_all_namespaces, field_selector=f"spec.nodeName={self.config.node_name}"
        )
        present = {str(p["metadata"]["uid"]) for p in listing.get("items") or []}
        with self._lock:
            vanished = [w for uid, w in self.workers.items() if uid not in present]
        for worker in vanished:
            worker.vanished()
        for pod in listing.get("items") or []:
            self._handle("ADDED", pod)
        return str(listing["metadata"]["resourceVersion"])

    def _watch(self, resource_version: str) -> Iterator[tuple[str, JSON]]:
        response = self.core.list_pod_for_all_namespaces(
            field_selector=f"spec.nodeName={self.config.node_name}",
            watch=True,
            resource_version=resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=self.config.watch_timeout_seconds,
            _preload_content=False,
        )
        try:
            for line in iter_resp_lines(response):  # type: ignore[no-untyped-call]
                if self._stop.is_set():
                    return
                event = json.loads(line)
                yield str(event["type"]), event["object"]
        finally:
            response.release_conn()

    def run(self) -> None:
        """Register, then serve Pods until `stop()`."""
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        if self.kubelet_server is not None:
            self.kubelet_server.serve_in_thread()
        self.register()
        threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True).start()
        resource_version: str | None = None
        while not self._stop.is_set():
            try:
                if resource_version is None:
                    resource_version = self._list()
                for kind, obj in self._watch(resource_version):
                    if kind == "ERROR":
                        if obj.get("code") == 410:  # too old: start over from a fresh list
                            resource_version = None
                            break
                        raise RuntimeError(f"watch error: {obj}")
                    resource_version = str(obj["metadata"]["resourceVersion"])
                    if kind != "BOOKMARK":
                        self._handle(kind, obj)
            except Exception:
                if self._stop.is_set():
                    break
                logger.exception("pod watch failed; relisting")
                resource_version = None
                self._stop.wait(1.0)

    def stop(self) -> None:
        """Stop watching and kill every container (the agent going away takes its containers along)."""
        self._stop.set()
        with self._lock:
            workers = list(self.workers.values())
        for worker in workers:
            for container in worker.containers:
                if container.handle is not None:
                    container.handle.kill()
        self._deleter.shutdown(wait=False, cancel_futures=True)
        self._prober.shutdown(wait=False, cancel_futures=True)
        if self.kubelet_server is not None:
            self.kubelet_server.shutdown()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m localcluster.node_agent", description=__doc__.split("\n")[0])
    parser.add_argument("--kubeconfig", required=True, type=Path, help="credentials as system:node:<name>")
    parser.add_argument("--state-dir", required=True, type=Path, help="pod logs and volumes go here")
    parser.add_argument("--node-name", default="localcluster-node")
    parser.add_argument("--images-dir", type=Path, help="host images (default: <state-dir>/images)")
    parser.add_argument("--working-dir", type=Path, default=Path.cwd(), help="containers' default working directory")
    parser.add_argument("--path", default=os.environ.get("PATH", os.defpath), help="PATH of every container")
    parser.add_argument("--cpu", default=str(os.cpu_count() or 1))
    parser.add_argument("--memory", default="")
    parser.add_argument("--max-pods", type=int, default=110)
    parser.add_argument("--config-retry-seconds", type=float, default=2.0)
    parser.add_argument("--restart-backoff-seconds", type=float, default=10.0)
    # The kubelet's own flag names for its HTTPS API.
    parser.add_argument("--tls-cert-file", type=Path, help="serving certificate of the kubelet API")
    parser.add_argument("--tls-private-key-file", type=Path)
    parser.add_argument("--client-ca-file", type=Path, help="CA that signs the kubelet API's clients")
    parser.add_argument("--port", type=int, default=0, help="kubelet API port on 127.0.0.1 (0: a free one)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(threadName)s: %(message)s")
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=str(args.kubeconfig), client_configuration=configuration
    )
    configuration.connection_pool_maxsize = 32
    api = kubernetes.client.ApiClient(configuration)
    api.user_agent = "localcluster-node-agent"
    state_dir = args.state_dir.resolve()
    runtime = HostProcessRuntime(
        images_dir=(args.images_dir or state_dir / "images").resolve(),
        working_dir=args.working_dir.resolve(),
        path=args.path,
    )
    config = AgentConfig(
        node_name=args.node_name,
        state_dir=state_dir,
        cpu=args.cpu,
        memory=args.memory,
        max_pods=args.max_pods,
        config_retry_seconds=args.config_retry_seconds,
        restart_backoff_seconds=args.restart_backoff_seconds,
        tls_cert_file=args.tls_cert_file,
        tls_private_key_file=args.tls_private_key_file,
        client_ca_file=args.client_ca_file,
        kubelet_port=args.port,
    )
    agent = NodeAgent(api, config, runtime)

    def on_signal(signum: int, _frame: object) -> None:
        agent.stop()
        raise KeyboardInterrupt  # out of the blocking watch read

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with contextlib.suppress(KeyboardInterrupt):
        agent.run()
    agent.stop()
    sys.exit(0)


if __name__ == "__main__":
    main()
