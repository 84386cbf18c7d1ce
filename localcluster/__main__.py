"""``python -m localcluster up|down|status [--state-dir DIR] [--runtime podman|host]``: the local Kubernetes cluster.

``up`` starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler and the node agent
(whatever is not running already) and prints the ``export KUBECONFIG=...`` line to use it. The
node agent runs containers with ``--runtime`` (default: podman when it is installed, in the Pods'
images; ``host``: as host processes, see `localcluster.runtime`; it applies when the node agent
starts, so ``down`` first to change it);
``down`` stops them (state, certificates and data stay in the state directory, default
``<repo>/.cluster``); ``status`` prints what is running and exits 1 if anything is not.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from localcluster.cluster import RUNTIMES, LocalCluster, default_runtime
from localcluster.controlplane import REPO_ROOT, MissingBinariesError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localcluster", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument("--state-dir", type=Path, default=REPO_ROOT / ".cluster")
    parser.add_argument("--bin-dir", type=Path, help="the built Kubernetes binaries (default: build.sh's cache)")
    parser.add_argument("--runtime", choices=RUNTIMES, default=default_runtime(), help="the node's container runtime")
    args = parser.parse_args(argv)
    cluster = LocalCluster(args.state_dir, bin_dir=args.bin_dir, runtime=args.runtime)
    if args.command == "up":
        try:
            cluster.up()
        except MissingBinariesError as e:
            print(f"localcluster: {e}", file=sys.stderr)
            return 2
        except RuntimeError as e:
            print(f"localcluster: {e}", file=sys.stderr)
            return 1
        print(f"# kubectl: {cluster.control_plane.kubectl_path}; logs: {cluster.state_dir / 'logs'}")
        print(f"export KUBECONFIG={cluster.kubeconfig}")
        return 0
    if args.command == "down":
        cluster.down()
        return 0
    status = cluster.status()
    for name, alive in status.items():
        print(f"{name:<24} {'up' if alive else 'down'}")
    return 0 if all(status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
