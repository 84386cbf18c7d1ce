"""What the kubelet derives from a container's spec before it asks the runtime for a container.

Pure functions over the Pod as a plain dict: the effective security context (the Pod's
``securityContext`` with the container's own on top, as ``DetermineEffectiveSecurityContext``
merges them), the kubelet's ``runAsNonRoot`` check against the image's user, and the resource
limits a runtime enforces.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubernetes.utils.quantity import parse_quantity

from localcluster.runtime import SecurityContext


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def effective_security_context(pod_spec: Mapping[str, Any], container: Mapping[str, Any]) -> SecurityContext:
    pod_sc: Mapping[str, Any] = pod_spec.get("securityContext") or {}
    sc: Mapping[str, Any] = container.get("securityContext") or {}

    def pick(key: str) -> Any:
        return sc[key] if sc.get(key) is not None else pod_sc.get(key)

    seccomp: Mapping[str, Any] = pick("seccompProfile") or {}
    capabilities: Mapping[str, Any] = sc.get("capabilities") or {}
    groups = [int(g) for g in pod_sc.get("supplementalGroups") or []]
    if pod_sc.get("fsGroup") is not None:
        groups.append(int(pod_sc["fsGroup"]))
    return SecurityContext(
        run_as_user=_int(pick("runAsUser")),
        run_as_group=_int(pick("runAsGroup")),
        run_as_non_root=bool(pick("runAsNonRoot")),
        supplemental_groups=tuple(dict.fromkeys(groups)),
        read_only_root_filesystem=bool(sc.get("readOnlyRootFilesystem")),
        allow_privilege_escalation=sc.get("allowPrivilegeEscalation"),
        privileged=bool(sc.get("privileged")),
        capabilities_add=tuple(str(c) for c in capabilities.get("add") or []),
        capabilities_drop=tuple(str(c) for c in capabilities.get("drop") or []),
        seccomp_profile=seccomp.get("type"),
        seccomp_localhost_profile=seccomp.get("localhostProfile"),
    )


def image_uid(user: str) -> tuple[int | None, str]:
    """(uid, "") for a numeric image user, (None, name) for a name; an empty user runs as root (0)."""
    name = user.split(":", 1)[0]
    if not name:
        return 0, ""
    return (int(name), "") if name.isdigit() else (None, name)


def run_as_non_root_violation(
    security: SecurityContext, image_user: str | None, *, pod: str, container: str
) -> str | None:
    """The kubelet's ``verifyRunAsNonRoot`` message when the container may not start, else None.

    ``image_user`` None means the runtime cannot tell (the host runtime): nothing is checked then.
    ``pod`` is the kubelet's ``format.Pod``: ``name_namespace(uid)``.
    """
    if not security.run_as_non_root:
        return None
    where = f'(pod: "{pod}", container: {container})'
    if security.run_as_user is not None:
        return f"container's runAsUser breaks non-root policy {where}" if security.run_as_user == 0 else None
    if image_user is None:
        return None
    uid, name = image_uid(image_user)
    if uid == 0:
        return f"container has runAsNonRoot and image will run as root {where}"
    if uid is None:
        cannot = "cannot verify user is non-root"
        return f"container has runAsNonRoot and image has non-numeric user ({name}), {cannot} {where}"
    return None


def limits(container: Mapping[str, Any]) -> tuple[int | None, float | None]:
    """(memory limit in bytes, CPU limit in cores) from ``resources.limits``."""
    given: Mapping[str, Any] = (container.get("resources") or {}).get("limits") or {}
    memory = given.get("memory")
    cpu = given.get("cpu")
    return (
        None if memory is None else int(parse_quantity(memory)),  # type: ignore[no-untyped-call]
        None if cpu is None else float(parse_quantity(cpu)),  # type: ignore[no-untyped-call]
    )
