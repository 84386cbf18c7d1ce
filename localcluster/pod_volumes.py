"""A Pod's volumes as host directories, set up by the node agent as the kubelet's volume manager does.

- ``emptyDir``: a directory of the Pod's, mode 0777 (any container user may write), group-owned by
  ``fsGroup`` with the set-group-id bit when the Pod has one. ``medium`` and ``sizeLimit`` are not
  enforced (it is always on disk).
- ``secret``, ``configMap`` and ``projected`` (sources ``serviceAccountToken``, ``secret``,
  ``configMap``, ``downwardAPI``): files written once before the first container starts, with
  ``items``, ``optional`` and ``defaultMode``/``mode`` (default 0644); always mounted read-only.
  A ``serviceAccountToken`` comes from the TokenRequest API, bound to the Pod (``boundObjectRef``),
  as the API server lets a node request for the ServiceAccounts of its Pods (and only for an
  audience a Pod's spec asks for: ServiceAccountNodeAudienceRestriction), and is replaced
  (atomically, by rename) once 80% of its ``expirationSeconds`` has passed, as the kubelet's token
  manager does. This is how ``automountServiceAccountToken`` reaches a container: the API server's
  ServiceAccount admission adds the ``kube-api-access-*`` projected volume (token, ``ca.crt`` from
  the ``kube-root-ca.crt`` ConfigMap, the namespace) and its mount at
  ``/var/run/secrets/kubernetes.io/serviceaccount`` to every Pod that automounts, and to no other.
- ``subPath`` mounts that file or directory of the volume (created in an ``emptyDir``);
  ``subPathExpr`` is not provided.
- A missing Secret or ConfigMap (not optional) keeps the container waiting (`VolumeNotReady`,
  the kubelet's ``FailedMount``) and is tried again; any other volume type is `UnsupportedVolume`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JSON = dict[str, Any]
MATERIALISED = ("emptyDir", "secret", "configMap", "projected")
DEFAULT_MODE = 0o644
TOKEN_REFRESH_FRACTION = 0.8  # the kubelet's token manager renews at 80% of the TTL
DEFAULT_TOKEN_SECONDS = 3600

# (kind, namespace, name, optional) -> the object's data (Secret values decoded) or None when
# absent and optional; raises VolumeNotReady otherwise.
ReadData = Callable[[str, str, str, bool], dict[str, str] | None]
# (namespace, service account, audience or None, expiration seconds) -> the token.
RequestToken = Callable[[str, str, str | None, int], str]
FieldValue = Callable[[str], str]


class VolumeNotReady(Exception):
    """A volume's source cannot be read yet (kubelet Event FailedMount); tried again."""


class UnsupportedVolume(Exception):
    """A volume type this node agent does not provide (kubelet reason CreateContainerError)."""


def volume_type(volume: Mapping[str, Any]) -> str:
    return next((key for key in volume if key != "name"), "")


def token_refresh_due(obtained_at: float, expiration_seconds: int, now: float) -> bool:
    return now >= obtained_at + TOKEN_REFRESH_FRACTION * expiration_seconds


def _write(path: Path, content: str | bytes, mode: int) -> None:
    """Atomically, so a container reading the file never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(content.encode() if isinstance(content, str) else content)
    partial.chmod(mode)
    partial.replace(path)


@dataclass
class _Token:
    path: Path
    namespace: str
    service_account: str
    audience: str | None
    expiration_seconds: int
    mode: int
    obtained_at: float = 0.0


class PodVolumes:
    """The volumes of one Pod under ``<pod_dir>/volumes/<name>``, each set up once, tokens kept fresh."""

    def __init__(
        self,
        pod_dir: Path,
        pod: JSON,
        *,
        read: ReadData,
        request_token: RequestToken,
        field_value: FieldValue,
        all_types: bool,
    ) -> None:
        self.root = pod_dir / "volumes"
        self.pod = pod
        self.read = read
        self.request_token = request_token
        self.field_value = field_value
        self.all_types = all_types  # False: emptyDir only, other types ignored (the host runtime)
        spec = pod.get("spec") or {}
        self.volumes: dict[str, JSON] = {str(v.get("name")): v for v in spec.get("volumes") or []}
        self.fs_group: int | None = (spec.get("securityContext") or {}).get("fsGroup")
        self._ready: dict[str, Path] = {}
        self._tokens: list[_Token] = []

    def mounts(self, container: Mapping[str, Any]) -> tuple[dict[str, Path], frozenset[str]]:
        """(mountPath -> host directory, the read-only mountPaths) for one container."""
        mounts: dict[str, Path] = {}
        read_only: set[str] = set()
        for mount in container.get("volumeMounts") or []:
            volume = self.volumes.get(str(mount.get("name")))
            if volume is None:
                continue  # the API server validates references; nothing to mount
            kind = volume_type(volume)
            if kind not in MATERIALISED or (not self.all_types and kind != "emptyDir"):
                if self.all_types:
                    raise UnsupportedVolume(f"volume {volume['name']!r}: type {kind} is not supported by this node")
                continue
            if mount.get("subPathExpr"):
                if not self.all_types:
                    continue
                raise UnsupportedVolume(f"volume {volume['name']!r}: subPathExpr is not supported by this node")
            host_dir = self._set_up(volume, kind)
            if mount.get("subPath"):  # the API server has refused absolute paths and ".."
                root, host_dir = host_dir, host_dir / str(mount["subPath"])
                if kind == "emptyDir" and not host_dir.exists():
                    # As the kubelet makes it: the volume root's mode and owner.
                    host_dir.mkdir(parents=True)
                    owner = root.stat()
                    os.chown(host_dir, owner.st_uid, owner.st_gid)
                    host_dir.chmod(owner.st_mode & 0o7777)
                elif not host_dir.exists():
                    raise VolumeNotReady(f"volume {volume['name']!r} has no {mount['subPath']!r}")
            path = str(mount["mountPath"]).rstrip("/") or "/"
            mounts[path] = host_dir
            if kind != "emptyDir" or mount.get("readOnly"):
                read_only.add(path)
        return mounts, frozenset(read_only)

    def _set_up(self, volume: JSON, kind: str) -> Path:
        name = str(volume["name"])
        if name in self._ready:
            return self._ready[name]
        host_dir = self.root / name
        if kind == "emptyDir":
            host_dir.mkdir(parents=True, exist_ok=True)
            mode = 0o777
            if self.fs_group is not None:
                os.chown(host_dir, -1, int(self.fs_group))
                mode |= 0o2000
            host_dir.chmod(mode)
        else:
            # Everything is read (and may fail) before anything is written: a volume is whole or absent.
            files, tokens = self._contents(volume, kind, host_dir)
            for path, (content, mode) in files.items():
                _write(path, content, mode)
            for token in tokens:
                self._refresh(token)
            self._tokens += tokens
            host_dir.mkdir(parents=True, exist_ok=True)
            if self.fs_group is not None:
                for path in [host_dir, *host_dir.rglob("*")]:
                    os.chown(path, -1, int(self.fs_group))
        self._ready[name] = host_dir
        return host_dir

    def _contents(self, volume: JSON, kind: str, host_dir: Path) -> tuple[dict[Path, tuple[str, int]], list[_Token]]:
        namespace = str(self.pod["metadata"]["namespace"])
        files: dict[Path, tuple[str, int]] = {}
        tokens: list[_Token] = []
        body: JSON = volume[kind] or {}
        default_mode = int(body.get("defaultMode", DEFAULT_MODE))
        if kind == "secret":
            sources: list[JSON] = [{"secret": {**body, "name": body.get("secretName")}}]
        elif kind == "configMap":
            sources = [{"configMap": body}]
        else:
            sources = list(body.get("sources") or [])
        for source in sources:
            if "serviceAccountToken" in source:
                item = source["serviceAccountToken"]
                tokens.append(_Token(
                    path=host_dir / str(item.get("path") or "token"), namespace=namespace,
                    service_account=str((self.pod.get("spec") or {}).get("serviceAccountName") or "default"),
                    audience=item.get("audience") or None,
                    expiration_seconds=int(item.get("expirationSeconds") or DEFAULT_TOKEN_SECONDS),
                    mode=default_mode,
                ))  # fmt: skip
            elif "downwardAPI" in source:
                for item in source["downwardAPI"].get("items") or []:
                    field_path = (item.get("fieldRef") or {}).get("fieldPath")
                    if field_path is None:
                        raise UnsupportedVolume(f"volume {volume['name']!r}: only fieldRef items are supported")
                    mode = int(item.get("mode", default_mode))
                    files[host_dir / str(item["path"])] = (self.field_value(field_path), mode)
            elif "secret" in source or "configMap" in source:
                kind_of = "Secret" if "secret" in source else "ConfigMap"
                ref = source["secret"] if "secret" in source else source["configMap"]
                data = self.read(kind_of, namespace, str(ref.get("name")), bool(ref.get("optional")))
                if data is None:
                    continue
                items = ref.get("items")
                if items is None:
                    items = [{"key": key, "path": key} for key in data]
                for item in items:
                    if item["key"] not in data:
                        if ref.get("optional"):
                            continue
                        raise VolumeNotReady(f"{kind_of.lower()} {ref.get('name')!r} has no key {item['key']!r}")
                    files[host_dir / str(item["path"])] = (data[item["key"]], int(item.get("mode", default_mode)))
            else:
                raise UnsupportedVolume(f"volume {volume['name']!r}: projected source {sorted(source)} not supported")
        return files, tokens

    def _refresh(self, token: _Token) -> None:
        value = self.request_token(token.namespace, token.service_account, token.audience, token.expiration_seconds)
        _write(token.path, value, token.mode)
        if self.fs_group is not None:
            os.chown(token.path, -1, int(self.fs_group))
        token.obtained_at = time.monotonic()

    def refresh_tokens(self, now: float | None = None) -> None:
        """Renew each token 80% through its lifetime at ``now`` (monotonic; an API error: next time)."""
        now = time.monotonic() if now is None else now
        for token in self._tokens:
            if token_refresh_due(token.obtained_at, token.expiration_seconds, now):
                with contextlib.suppress(VolumeNotReady):
                    self._refresh(token)
