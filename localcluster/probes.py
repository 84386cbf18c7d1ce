"""The kubelet's container probes (startup, liveness, readiness) as the node agent plays them.

`ContainerProber` holds one container instance's probe state: when each probe is due, the
consecutive successes and failures, and the result they add up to, with the kubelet's defaults
(``periodSeconds`` 10, ``timeoutSeconds`` 1, ``successThreshold`` 1, ``failureThreshold`` 3) and
initial results (liveness passes, readiness fails, startup is unknown until it passes). A startup
probe holds back the other two until it succeeds; ``initialDelaySeconds`` counts from the
container's start. `run_probe` performs one probe action and returns (success, output):

- ``httpGet``: containers share the host's network, so the default host is the Pod IP 127.0.0.1;
  a named port is looked up in the container's ``ports``; a status from 200 to 399 passes.
- ``tcpSocket``: a connection that opens passes.
- ``exec``: the runtime's `RunningContainer.exec`; exit code 0 passes. The runtime gives back only
  the exit code, so a failure's output names the code where the kubelet quotes the command's output.
- ``grpc`` is not played: such a probe errors (and so fails), with a message saying why.

The agent's Pod loop asks `ContainerProber.due` and submits `run_probe` to a thread pool, then
feeds the result back with `ContainerProber.record`; nothing here sleeps.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import subprocess
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from localcluster.runtime import RunningContainer

JSON = dict[str, Any]
KINDS = ("Startup", "Liveness", "Readiness")  # the kubelet's probeType words, as its Events say them
SPEC_KEYS = {"Startup": "startupProbe", "Liveness": "livenessProbe", "Readiness": "readinessProbe"}
POD_IP = "127.0.0.1"
USER_AGENT = "kube-probe/1.34"


class ProbeError(Exception):
    """The probe could not be carried out (the kubelet's "probe errored"): a failure."""


@dataclass
class ProbeState:
    kind: str
    spec: JSON
    next_due: float
    result: bool | None
    successes: int = 0
    failures: int = 0
    pending: Future[tuple[bool, str]] | None = None

    def _int(self, key: str, default: int) -> int:
        value = self.spec.get(key)
        return default if value is None else int(value)

    @property
    def period(self) -> float:
        return float(max(self._int("periodSeconds", 10), 1))

    @property
    def timeout(self) -> float:
        return float(max(self._int("timeoutSeconds", 1), 1))

    def record(self, success: bool) -> None:
        """Count one result; the probe's result flips once its threshold of the same results is met."""
        if success:
            self.successes, self.failures = self.successes + 1, 0
            if self.successes >= max(self._int("successThreshold", 1), 1):
                self.result = True
        else:
            self.failures, self.successes = self.failures + 1, 0
            if self.failures >= max(self._int("failureThreshold", 3), 1):
                self.result = False


@dataclass
class ContainerProber:
    """The probes of one container instance (a restart starts a new one)."""

    instance: int  # the container's restartCount when it started
    probes: dict[str, ProbeState] = field(default_factory=dict)

    @classmethod
    def for_container(cls, container_spec: JSON, instance: int, started: float) -> ContainerProber:
        initial = {"Startup": None, "Liveness": True, "Readiness": False}
        probes = {}
        for kind in KINDS:
            spec = container_spec.get(SPEC_KEYS[kind])
            if spec:
                delay = float(spec.get("initialDelaySeconds") or 0)
                probes[kind] = ProbeState(kind=kind, spec=spec, next_due=started + delay, result=initial[kind])
        return cls(instance=instance, probes=probes)

    @property
    def started(self) -> bool:
        startup = self.probes.get("Startup")
        return startup is None or startup.result is True

    @property
    def ready(self) -> bool:
        readiness = self.probes.get("Readiness")
        return self.started and (readiness is None or readiness.result is True)

    def active(self) -> list[ProbeState]:
        """The probes that run now: startup until it passes, then liveness and readiness."""
        if not self.started:
            return [self.probes["Startup"]]
        return [p for kind, p in self.probes.items() if kind != "Startup"]

    def failed(self) -> ProbeState | None:
        """A startup or liveness probe that reached its failure threshold: the container must go."""
        for kind in ("Startup", "Liveness"):
            probe = self.probes.get(kind)
            if probe is not None and probe.result is False:
                return probe
        return None


def resolve_port(port: object, container_spec: JSON) -> int:
    if isinstance(port, int):
        return port
    text = str(port)
    if text.isdigit():
        return int(text)
    for declared in container_spec.get("ports") or []:
        if declared.get("name") == text:
            return int(declared["containerPort"])
    raise ProbeError(f"couldn't find port {text!r} in the container's ports")


def _dial_error(host: str, port: int, error: OSError) -> str:
    if isinstance(error, ConnectionRefusedError):
        return f"dial tcp {host}:{port}: connect: connection refused"
    if isinstance(error, TimeoutError):
        return f"dial tcp {host}:{port}: i/o timeout"
    return f"dial tcp {host}:{port}: {error}"


def http_get(action: JSON, container_spec: JSON, timeout: float) -> tuple[bool, str]:
    host = str(action.get("host") or POD_IP)
    port = resolve_port(action.get("port"), container_spec)
    scheme = str(action.get("scheme") or "HTTP").upper()
    path = str(action.get("path") or "/")
    if not path.startswith("/"):
        path = "/" + path
    url = f"{scheme.lower()}://{host}:{port}{path}"
    connection: http.client.HTTPConnection
    if scheme == "HTTPS":  # the kubelet does not verify a probed container's certificate
        connection = http.client.HTTPSConnection(host, port, timeout=timeout, context=ssl._create_unverified_context())  # noqa: S323
    else:
        connection = http.client.HTTPConnection(host, port, timeout=timeout)
    headers = {"User-Agent": USER_AGENT, "Accept": "*/*"}
    headers |= {str(h.get("name")): str(h.get("value", "")) for h in action.get("httpHeaders") or []}
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        response.read(10 * 1024)
    except TimeoutError:
        return False, f'Get "{url}": context deadline exceeded (Client.Timeout exceeded while awaiting headers)'
    except OSError as e:
        return False, f'Get "{url}": {_dial_error(host, port, e)}'
    except http.client.HTTPException as e:
        return False, f'Get "{url}": {e!r}'
    finally:
        connection.close()
    if 200 <= response.status < 400:
        return True, ""
    return False, f"HTTP probe failed with statuscode: {response.status}"


def tcp_socket(action: JSON, container_spec: JSON, timeout: float) -> tuple[bool, str]:
    host = str(action.get("host") or POD_IP)
    port = resolve_port(action.get("port"), container_spec)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True, ""
    except OSError as e:
        return False, _dial_error(host, port, e)


def exec_command(action: JSON, handle: RunningContainer, timeout: float) -> tuple[bool, str]:
    argv = [str(a) for a in action.get("command") or []]
    if not argv:
        raise ProbeError("exec probe without a command")
    try:
        code = handle.exec(argv, timeout)
    except (TimeoutError, subprocess.TimeoutExpired):
        return False, f"command {' '.join(argv)!r} timed out"
    return code == 0, "" if code == 0 else f"command {' '.join(argv)!r} exited with {code}"


def run_probe(probe: ProbeState, container_spec: JSON, handle: RunningContainer) -> tuple[bool, str]:
    """Carry out one probe: (passed, the kubelet's wording of what failed)."""
    actions: dict[str, Callable[[], tuple[bool, str]]] = {
        "httpGet": lambda: http_get(probe.spec["httpGet"], container_spec, probe.timeout),
        "tcpSocket": lambda: tcp_socket(probe.spec["tcpSocket"], container_spec, probe.timeout),
        "exec": lambda: exec_command(probe.spec["exec"], handle, probe.timeout),
    }
    for key, action in actions.items():
        if key in probe.spec:
            try:
                return action()
            except ProbeError as e:
                return False, str(e)
    return False, "grpc probes are not supported by this node agent" if "grpc" in probe.spec else "no probe action"
