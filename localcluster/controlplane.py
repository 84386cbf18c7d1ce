"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager, kube-scheduler.

The binaries are the pinned release built by ``localcluster/build.sh`` (``make cluster-bin``) into a
per-version cache outside the repo. Everything else lives in the state directory: certificates
(``pki/``), etcd's data, pid files, logs (``logs/<component>.log``), the audit log and the kubeconfigs
(``kubeconfig`` is the admin's, in ``system:masters``).

The API server runs as a production one is configured in the parts this project depends on:
Node and RBAC authorization, the default admission plugins plus ``NodeRestriction`` and
``OwnerReferencesPermissionEnforcement``, ServiceAccount tokens signed by a key of its own, and an
audit log with one ``Metadata`` line per request (``audit_events()`` reads it). The controller
manager runs only the controllers a batch workload and the operator's Deployment need (see
``CONTROLLERS``), each under its own ServiceAccount. The API server reaches the node agent's kubelet
API (``kubectl logs``) with a client certificate of its own, bound to ``system:kubelet-api-admin``.
``up()`` is idempotent and ``down()`` stops what ``up()`` started, from any process.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes.client
import kubernetes.config

from localcluster.kubeconfig import write_kubeconfig
from localcluster.pki import PKI, CertKey
from localcluster.processes import ManagedProcess

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
BINARIES = (*COMPONENTS, "kubectl")
SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/12"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
KUBELET_CLIENT_USER = "kube-apiserver-kubelet-client"  # the API server, when it calls a kubelet
KUBELET_CLIENT_BINDING = "localcluster:kube-apiserver-kubelet-api-admin"
# Canonical names (kube-controller-manager --help). node-lifecycle removes the not-ready taint the
# TaintNodesByCondition admission puts on every new Node; without it nothing is ever scheduled.
# root-ca-certificate-publisher writes kube-root-ca.crt, which ServiceAccount token volumes reference.
# deployment and replicaset: `kubectl apply -k deploy/` and `kubectl rollout status` work as in a cluster.
CONTROLLERS = (
    "job-controller",
    "deployment-controller",
    "replicaset-controller",
    "garbage-collector-controller",
    "ttl-after-finished-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "node-lifecycle-controller",
    "root-ca-certificate-publisher-controller",
)
# Reads and writes alike, one line per request at ResponseComplete (watches also at
# ResponseStarted), without bodies. Leases are renewed every few seconds by every component and
# would drown everything else; health probes are not API calls.
AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: None
    resources: [{group: coordination.k8s.io, resources: [leases]}]
  - level: None
    nonResourceURLs: ["/healthz*", "/readyz*", "/livez*"]
  - level: Metadata
"""


class MissingBinariesError(RuntimeError):
    """The pinned Kubernetes binaries have not been built on this machine."""


def kubernetes_version() -> str:
    for line in (HERE / "go.mod").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "k8s.io/kubernetes" and parts[1].startswith("v"):
            return parts[1]
    raise RuntimeError("localcluster/go.mod does not require k8s.io/kubernetes")


def default_bin_dir() -> Path:
    """Where build.sh puts the binaries (same rule: $DBT_BACKFILL_CACHE, $XDG_CACHE_HOME, ~/.cache)."""
    cache = os.environ.get("DBT_BACKFILL_CACHE") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dbt-backfill"
    )
    return Path(cache) / "k8s" / kubernetes_version()


def check_binaries(bin_dir: Path, names: tuple[str, ...] = BINARIES) -> None:
    missing = [name for name in names if not os.access(bin_dir / name, os.X_OK)]
    if missing:
        raise MissingBinariesError(
            f"Kubernetes binaries missing in {bin_dir}: {', '.join(missing)}; run `make cluster-bin` first"
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_for_process(process: ManagedProcess, check: Callable[[], bool], *, timeout: float, what: str) -> None:
    """Wait until ``check()`` is true; fail at once, with its log, if ``process`` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except Exception:  # noqa: S110  # not up yet: connection refused, 5xx, ...
            pass
        if not process.alive():
            raise RuntimeError(f"{process.name} exited before {what}; {process.log_file}:\n{process.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}\n{process.log_tail()}")
        time.sleep(0.1)


@dataclass(frozen=True)
class Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int


class ControlPlane:
    """The control plane in ``state_dir``; ``up()`` starts what is not running, ``down()`` stops it."""

    def __init__(self, state_dir: Path, *, bin_dir: Path | None = None, die_with_parent: bool = False) -> None:
        self.state_dir = state_dir.resolve()
        self.bin_dir = bin_dir or default_bin_dir()
        self.die_with_parent = die_with_parent
        self.pki = PKI(self.state_dir / "pki")
        self.processes = {name: ManagedProcess(name, self.state_dir) for name in COMPONENTS}
        self.kubeconfig = self.state_dir / "kubeconfig"
        self.audit_log = self.state_dir / "logs" / "audit.log"
        self._ports_file = self.state_dir / "ports.json"

    # -- addresses ---------------------------------------------------------------------------------

    @property
    def ports(self) -> Ports:
        return Ports(**json.loads(self._ports_file.read_text()))

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports.apiserver}"

    @property
    def kubectl_path(self) -> Path:
        return self.bin_dir / "kubectl"

    def _choose_ports(self) -> Ports:
        """Reuse the last ports when they are free, so kubeconfigs written before stay valid."""
        try:
            previous = self.ports
        except (OSError, ValueError, TypeError):
            previous = None
        if previous is not None and all(_port_is_free(p) for p in vars(previous).values()):
            return previous
        chosen: set[int] = set()
        while len(chosen) < 3:
            chosen.add(_free_port())
        etcd_client, etcd_peer, apiserver = sorted(chosen)
        ports = Ports(etcd_client=etcd_client, etcd_peer=etcd_peer, apiserver=apiserver)
        self._ports_file.write_text(json.dumps(vars(ports)))
        return ports

    # -- state -------------------------------------------------------------------------------------

    def running(self) -> dict[str, bool]:
        return {name: process.alive() for name, process in self.processes.items()}

    def ready(self) -> bool:
        """The API server answers /readyz with 200 to the admin credential."""
        try:
            with urllib.request.urlopen(f"{self.server}/readyz", context=self._admin_tls(), timeout=5) as response:  # noqa: S310
                return int(response.status) == 200
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def _admin_tls(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.directory / "ca.crt"))
        admin = self._admin_credential()
        context.load_cert_chain(str(admin.cert), str(admin.key))
        return context

    # -- credentials -------------------------------------------------------------------------------

    def _admin_credential(self) -> CertKey:
        return self.pki.certificate("admin", common_name="localcluster-admin", organizations=("system:masters",))

    def node_credentials(self, node_name: str) -> tuple[Path, CertKey]:
        """(kubeconfig as ``system:node:<name>``, the node's serving certificate for its own endpoint)."""
        client = self.pki.certificate(
            f"node-{node_name}", common_name=f"system:node:{node_name}", organizations=("system:nodes",)
        )
        serving = self.pki.certificate(
            f"node-{node_name}-serving", common_name=node_name, server=True, ips=("127.0.0.1",), dns=(node_name,)
        )
        path = write_kubeconfig(
            self.state_dir / f"node-{node_name}.kubeconfig",
            server=self.server,
            ca_cert=self.pki.ca.cert,
            user=f"system:node:{node_name}",
            client=client,
        )
        return path, serving

    def api_client(self) -> kubernetes.client.ApiClient:
        configuration = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(self.kubeconfig), client_configuration=configuration
        )
        return kubernetes.client.ApiClient(configuration)

    def service_account_kubeconfig(
        self, namespace: str, name: str, path: Path, *, expiration_seconds: int = 86400
    ) -> Path:
        """A kubeconfig for ServiceAccount ``namespace/name`` with a token from the TokenRequest API."""
        with self.api_client() as client:
            core: Any = kubernetes.client.CoreV1Api(client)  # raw JSON, not the typed models
            response = core.create_namespaced_service_account_token(
                name,
                namespace,
                {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                 "spec": {"expirationSeconds": expiration_seconds}},
                _preload_content=False,
            )  # fmt: skip
            token = json.loads(response.data)["status"]["token"]
        return write_kubeconfig(
            path,
            server=self.server,
            ca_cert=self.pki.ca.cert,
            user=f"system:serviceaccount:{namespace}:{name}",
            token=token,
            namespace=namespace,
        )

    # -- lifecycle ---------------------------------------------------------------------------------

    def up(self) -> None:
        """Start every component that is not running; a no-op when all are up and ready."""
        if all(self.running().values()) and self.ready():
            return
        check_binaries(self.bin_dir, COMPONENTS)
        self.down()  # a partial control plane (a crash, a reboot) starts over from its data
        self.state_dir.mkdir(parents=True, exist_ok=True)
        ports = self._choose_ports()
        pki_dir = self.pki.directory
        ca = self.pki.ca
        sa_keys = self.pki.service_account_keys()
        serving = self.pki.certificate(
            "apiserver",
            common_name="kube-apiserver",
            server=True,
            ips=("127.0.0.1", "10.96.0.1"),
            dns=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                 "kubernetes.default.svc.cluster.local"),
        )  # fmt: skip
        # Not in system:masters: the node agent asks the API server whether this user may use the
        # kubelet API, and the binding to system:kubelet-api-admin (below) is what says yes.
        kubelet_client = self.pki.certificate("kube-apiserver-kubelet-client", common_name=KUBELET_CLIENT_USER)
        write_kubeconfig(self.kubeconfig, server=self.server, ca_cert=ca.cert, user="admin",
                         client=self._admin_credential())  # fmt: skip
        component_kubeconfigs = {
            name: write_kubeconfig(
                self.state_dir / f"{name}.kubeconfig",
                server=self.server,
                ca_cert=ca.cert,
                user=f"system:{name}",
                client=self.pki.certificate(name, common_name=f"system:{name}"),
            )
            for name in ("kube-controller-manager", "kube-scheduler")
        }
        audit_policy = self.state_dir / "audit-policy.yaml"
        audit_policy.write_text(AUDIT_POLICY)
        self.audit_log.parent.mkdir(parents=True, exist_ok=True)

        etcd_url = f"http://127.0.0.1:{ports.etcd_client}"
        peer_url = f"http://127.0.0.1:{ports.etcd_peer}"
        self._start("etcd", [
            "--name=localcluster",
            f"--data-dir={self.state_dir / 'etcd'}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=localcluster={peer_url}",
            "--log-level=warn",
            # A throwaway cluster: no fsync per write (etcd's own flag for tests) keeps it fast on
            # a shared disk. A machine crash can lose the last writes, never the consistency.
            "--unsafe-no-fsync",
        ])  # fmt: skip
        wait_for_process(self.processes["etcd"], lambda: self._etcd_healthy(etcd_url), timeout=30, what="etcd health")

        self._start("kube-apiserver", [
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={ports.apiserver}",
            f"--cert-dir={pki_dir}",
            f"--tls-cert-file={serving.cert}",
            f"--tls-private-key-file={serving.key}",
            f"--client-ca-file={ca.cert}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction,OwnerReferencesPermissionEnforcement",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={sa_keys.cert}",
            f"--service-account-signing-key-file={sa_keys.key}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            f"--kubelet-client-certificate={kubelet_client.cert}",
            f"--kubelet-client-key={kubelet_client.key}",
            f"--kubelet-certificate-authority={ca.cert}",
            "--kubelet-preferred-address-types=InternalIP,Hostname",
            f"--audit-policy-file={audit_policy}",
            f"--audit-log-path={self.audit_log}",
            "--audit-log-format=json",
            "--profiling=false",
        ])  # fmt: skip
        wait_for_process(self.processes["kube-apiserver"], self.ready, timeout=120, what="/readyz")
        self._bind_kubelet_client()

        self._start("kube-controller-manager", [
            f"--kubeconfig={component_kubeconfigs['kube-controller-manager']}",
            f"--authentication-kubeconfig={component_kubeconfigs['kube-controller-manager']}",
            f"--authorization-kubeconfig={component_kubeconfigs['kube-controller-manager']}",
            "--bind-address=127.0.0.1",
            "--secure-port=0",
            "--leader-elect=false",
            f"--controllers={','.join(CONTROLLERS)}",
            f"--root-ca-file={ca.cert}",
            f"--service-account-private-key-file={sa_keys.key}",
            "--use-service-account-credentials=true",
            "--profiling=false",
        ])  # fmt: skip
        self._start("kube-scheduler", [
            f"--kubeconfig={component_kubeconfigs['kube-scheduler']}",
            f"--authentication-kubeconfig={component_kubeconfigs['kube-scheduler']}",
            f"--authorization-kubeconfig={component_kubeconfigs['kube-scheduler']}",
            "--bind-address=127.0.0.1",
            "--secure-port=0",
            "--leader-elect=false",
            "--profiling=false",
        ])  # fmt: skip
        # The ServiceAccount controller creating `default` proves the controller manager works.
        wait_for_process(self.processes["kube-controller-manager"], self._default_service_account_exists,
                         timeout=60, what="the default ServiceAccount")  # fmt: skip

    def _bind_kubelet_client(self) -> None:
        """Let the API server's kubelet client use every node's kubelet API (kubeadm binds it alike)."""
        binding = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": KUBELET_CLIENT_BINDING},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "system:kubelet-api-admin",
            },
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": KUBELET_CLIENT_USER}],
        }
        with self.api_client() as client:
            rbac: Any = kubernetes.client.RbacAuthorizationV1Api(client)  # a plain dict body
            try:
                rbac.create_cluster_role_binding(binding)
            except kubernetes.client.ApiException as e:
                if e.status != 409:  # already there from an earlier start
                    raise

    def _start(self, name: str, args: list[str]) -> None:
        self.processes[name].start([str(self.bin_dir / name), *args], die_with_parent=self.die_with_parent)

    @staticmethod
    def _etcd_healthy(url: str) -> bool:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:  # noqa: S310  # loopback http
            return bool(json.loads(response.read()).get("health") == "true")

    def _default_service_account_exists(self) -> bool:
        with self.api_client() as client:
            kubernetes.client.CoreV1Api(client).read_namespaced_service_account("default", "default")
        return True

    def down(self) -> None:
        """Stop every component (in reverse start order); data and certificates stay."""
        for name in reversed(COMPONENTS):
            self.processes[name].stop()
