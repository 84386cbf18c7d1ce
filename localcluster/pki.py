"""The local cluster's certificates and keys, made with the ``openssl`` command line tool.

One CA signs every certificate: the API server's serving certificate, a client certificate per
identity (admin in ``system:masters``, the controller manager, the scheduler, the node agent as
``system:node:<name>``, the API server's kubelet client), and the node agent's serving
certificate. A separate key signs ServiceAccount tokens. Files that already exist are kept, so a
restarted cluster keeps its identities and a kubeconfig written earlier stays valid.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

DAYS = 3650  # a throwaway cluster on loopback: rotation is not the point


@dataclass(frozen=True)
class CertKey:
    cert: Path
    key: Path


def _openssl(*args: str) -> None:
    result = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {result.stderr.strip()}")


def _private_key(path: Path) -> Path:
    if not path.exists():
        partial = path.with_suffix(".partial")
        _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(partial))
        partial.chmod(0o600)
        partial.rename(path)
    return path


class PKI:
    """Certificates under ``directory``; each method creates its files once and returns their paths."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def ca(self) -> CertKey:
        key = _private_key(self.directory / "ca.key")
        cert = self.directory / "ca.crt"
        if not cert.exists():
            _openssl(
                "req", "-x509", "-new", "-key", str(key), "-subj", "/CN=dbt-backfill-localcluster-ca",
                "-days", str(DAYS), "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", str(cert),
            )  # fmt: skip
        return CertKey(cert, key)

    def service_account_keys(self) -> CertKey:
        """The key pair for ServiceAccount tokens: ``key`` signs them, ``cert`` (the public key) verifies."""
        key = _private_key(self.directory / "service-account.key")
        public = self.directory / "service-account.pub"
        if not public.exists():
            _openssl("pkey", "-in", str(key), "-pubout", "-out", str(public))
        return CertKey(public, key)

    def certificate(
        self,
        name: str,
        *,
        common_name: str,
        organizations: tuple[str, ...] = (),
        server: bool = False,
        ips: tuple[str, ...] = (),
        dns: tuple[str, ...] = (),
    ) -> CertKey:
        """A client (or, with ``server``, serving) certificate signed by the CA."""
        ca = self.ca
        key = _private_key(self.directory / f"{name}.key")
        cert = self.directory / f"{name}.crt"
        if not cert.exists():
            subject = "".join(f"/O={o}" for o in organizations) + f"/CN={common_name}"
            extensions = [
                "basicConstraints=critical,CA:FALSE",
                "keyUsage=critical,digitalSignature,keyEncipherment",
                f"extendedKeyUsage={'serverAuth' if server else 'clientAuth'}",
            ]
            names = [f"IP:{ip}" for ip in ips] + [f"DNS:{d}" for d in dns]
            if names:
                extensions.append("subjectAltName=" + ",".join(names))
            partial = cert.with_suffix(".partial")
            addext = [arg for ext in extensions for arg in ("-addext", ext)]
            _openssl(
                "req", "-new", "-key", str(key), "-subj", subject, "-x509", "-CA", str(ca.cert),
                "-CAkey", str(ca.key), "-days", str(DAYS), *addext, "-out", str(partial),
            )  # fmt: skip
            partial.rename(cert)
        return CertKey(cert, key)
