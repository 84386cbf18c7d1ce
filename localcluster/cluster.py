"""The whole local cluster: the control plane plus one node agent, as `make cluster-up` and the e2e tests run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import kubernetes.client

from localcluster.audit import read_audit_events
from localcluster.controlplane import REPO_ROOT, ControlPlane, wait_for_process
from localcluster.processes import ManagedProcess
from localcluster.runtime import image_file

NODE_NAME = "localcluster-node"


class LocalCluster:
    """A `ControlPlane` and the node agent serving ``NODE_NAME``, sharing one state directory.

    Containers run as host processes in ``working_dir`` (default: the repo root) with ``path`` as
    their ``PATH`` (default: this interpreter's directory first, so ``python`` is this venv's).
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        bin_dir: Path | None = None,
        working_dir: Path = REPO_ROOT,
        path: str | None = None,
        die_with_parent: bool = False,
        agent_options: tuple[str, ...] = (),
    ) -> None:
        self.control_plane = ControlPlane(state_dir, bin_dir=bin_dir, die_with_parent=die_with_parent)
        self.state_dir = self.control_plane.state_dir
        self.node_name = NODE_NAME
        self.working_dir = working_dir
        venv_bin = str(Path(sys.executable).parent)
        self.path = path or f"{self.control_plane.bin_dir}:{venv_bin}:/usr/local/bin:/usr/bin:/bin"
        self.die_with_parent = die_with_parent
        self.agent_options = agent_options
        self.agent = ManagedProcess("node-agent", self.state_dir)
        self.node_state_dir = self.state_dir / "node"
        self.images_dir = self.node_state_dir / "images"

    @property
    def kubeconfig(self) -> Path:
        """The admin's kubeconfig (``system:masters``)."""
        return self.control_plane.kubeconfig

    @property
    def server(self) -> str:
        return self.control_plane.server

    @property
    def audit_log(self) -> Path:
        return self.control_plane.audit_log

    @property
    def kubectl_path(self) -> Path:
        return self.control_plane.kubectl_path

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, kubeconfig: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the pinned kubectl as the admin (or with ``kubeconfig``); ``check`` raises with its stderr."""
        argv = [str(self.kubectl_path), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]
        env = os.environ | {"KUBECTL_INTERACTIVE_DELETE": "false"}
        result = subprocess.run(argv, input=input, capture_output=True, text=True, env=env, check=False, timeout=120)
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def api_client(self) -> kubernetes.client.ApiClient:
        """An official-client ApiClient logged in as the admin; close it when done."""
        return self.control_plane.api_client()

    def service_account_kubeconfig(self, namespace: str, name: str, path: Path | None = None) -> Path:
        """A kubeconfig with a TokenRequest token of ServiceAccount ``namespace/name`` (RBAC applies)."""
        path = path or self.state_dir / "serviceaccounts" / f"{namespace}_{name}.kubeconfig"
        return self.control_plane.service_account_kubeconfig(namespace, name, path)

    def audit_events(
        self,
        username: str | None = None,
        verbs: Iterable[str] | None = None,
        *,
        namespace: str | None = None,
    ) -> list[dict[str, Any]]:
        """Completed requests from the API server's audit log, oldest first, optionally filtered."""
        return read_audit_events(self.audit_log, username=username, verbs=verbs, namespace=namespace)

    def up(self) -> None:
        """Start whatever is not running (idempotent); returns once the Node is Ready and schedulable."""
        control_plane_was_up = all(self.control_plane.running().values()) and self.control_plane.ready()
        self.control_plane.up()
        if not control_plane_was_up:
            self.agent.stop()  # its credentials and server address may have changed
        if not self.agent.alive():
            kubeconfig, serving = self.control_plane.node_credentials(self.node_name)
            self.images_dir.mkdir(parents=True, exist_ok=True)
            self.agent.start(
                [sys.executable, "-m", "localcluster.node_agent", f"--kubeconfig={kubeconfig}",
                 f"--state-dir={self.node_state_dir}", f"--node-name={self.node_name}",
                 f"--working-dir={self.working_dir}", f"--path={self.path}",
                 f"--tls-cert-file={serving.cert}", f"--tls-private-key-file={serving.key}",
                 f"--client-ca-file={self.control_plane.pki.ca.cert}", *self.agent_options],
                cwd=REPO_ROOT,
                die_with_parent=self.die_with_parent,
            )  # fmt: skip
        wait_for_process(self.agent, self._node_schedulable, timeout=60, what=f"Node {self.node_name} Ready")

    def _node_schedulable(self) -> bool:
        with self.control_plane.api_client() as client:
            core: Any = kubernetes.client.CoreV1Api(client)  # raw JSON, not the typed models
            response = core.read_node(self.node_name, _preload_content=False)
            node = json.loads(response.data)
        conditions = (node.get("status") or {}).get("conditions") or []
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
        # node-lifecycle-controller lifts the not-ready taint admission put on the new Node.
        tainted = any(t.get("effect") == "NoSchedule" for t in (node.get("spec") or {}).get("taints") or [])
        return ready and not tainted

    def down(self) -> None:
        self.agent.stop()
        self.control_plane.down()

    def status(self) -> dict[str, bool]:
        return self.control_plane.running() | {"node-agent": self.agent.alive(), "readyz": self.control_plane.ready()}

    def define_image(
        self,
        name: str,
        *,
        env: dict[str, str] | None = None,
        working_dir: Path | None = None,
        entrypoint: list[str] | None = None,
        cmd: list[str] | None = None,
    ) -> Path:
        """Register a host "image" (see `localcluster.runtime`): what its containers see as the image's config."""
        config: dict[str, Any] = {"env": env or {}, "entrypoint": entrypoint or [], "cmd": cmd or []}
        if working_dir is not None:
            config["workingDir"] = str(working_dir)
        path = image_file(self.images_dir, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config))
        return path

    def pod_logs(self, namespace: str, pod: str, container: str | None = None) -> Iterator[Path]:
        """The log files the node agent keeps for a Pod's containers (every restart), oldest first."""
        for pod_dir in sorted((self.node_state_dir / "pods").glob(f"{namespace}_{pod}_*")):
            yield from sorted(pod_dir.glob(f"{container or '*'}/*.log"))
