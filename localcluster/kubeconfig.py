"""Kubeconfig files for the local cluster: one per identity, credentials embedded, mode 0600."""

from __future__ import annotations

import base64
from pathlib import Path

import yaml

from localcluster.pki import CertKey


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(
    path: Path,
    *,
    server: str,
    ca_cert: Path,
    user: str,
    client: CertKey | None = None,
    token: str | None = None,
    namespace: str | None = None,
) -> Path:
    """Write a kubeconfig for ``server`` that logs in with a client certificate or a bearer token."""
    if (client is None) == (token is None):
        raise ValueError("a kubeconfig needs exactly one of a client certificate or a token")
    credentials: dict[str, str] = (
        {"token": token}
        if token is not None
        else {"client-certificate-data": _b64(client.cert), "client-key-data": _b64(client.key)}  # type: ignore[union-attr]
    )
    context: dict[str, str] = {"cluster": "localcluster", "user": user}
    if namespace:
        context["namespace"] = namespace
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "localcluster", "cluster": {"server": server, "certificate-authority-data": _b64(ca_cert)}}
        ],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": user, "context": context}],
        "current-context": user,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(yaml.safe_dump(config, sort_keys=False))
    partial.chmod(0o600)
    partial.rename(path)
    return path
