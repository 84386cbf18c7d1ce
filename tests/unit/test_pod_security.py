"""What the node agent derives from a Pod before asking a runtime for a container, and the podman
arguments that carry it: pure functions, checked against the kubelet's rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from localcluster.node_agent import kubernetes_service_env
from localcluster.pod_security import effective_security_context, limits, run_as_non_root_violation
from localcluster.pod_volumes import token_refresh_due
from localcluster.podman_runtime import PodmanRuntime, container_name
from localcluster.runtime import ContainerSpec, SecurityContext

POD = "p_ns(uid-1)"
NON_ROOT = SecurityContext(run_as_non_root=True)


def test_the_containers_security_context_wins_over_the_pods_and_fs_group_joins_the_groups() -> None:
    pod_spec = {"securityContext": {"runAsUser": 1, "runAsGroup": 2, "runAsNonRoot": True, "fsGroup": 7,
                                    "supplementalGroups": [5, 7],
                                    "seccompProfile": {"type": "RuntimeDefault"}}}  # fmt: skip
    container = {"securityContext": {"runAsUser": 3, "readOnlyRootFilesystem": True,
                                     "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}}}  # fmt: skip
    sc = effective_security_context(pod_spec, container)
    assert (sc.run_as_user, sc.run_as_group, sc.run_as_non_root) == (3, 2, True)
    assert sc.supplemental_groups == (5, 7)
    assert sc.read_only_root_filesystem and sc.seccomp_profile == "RuntimeDefault"
    assert (sc.capabilities_drop, sc.capabilities_add) == (("ALL",), ("NET_BIND_SERVICE",))


@pytest.mark.parametrize(
    ("security", "image_user", "refused"),
    [
        (SecurityContext(run_as_non_root=True), "", "container has runAsNonRoot and image will run as root"),
        (SecurityContext(run_as_non_root=True), "0:0", "container has runAsNonRoot and image will run as root"),
        (
            SecurityContext(run_as_non_root=True),
            "dbt",
            "container has runAsNonRoot and image has non-numeric user (dbt)",
        ),
        (SecurityContext(run_as_non_root=True, run_as_user=0), "10001", "container's runAsUser breaks non-root policy"),
        (SecurityContext(run_as_non_root=True), "10001:10001", None),
        (SecurityContext(run_as_non_root=True, run_as_user=10001), "", None),
        (SecurityContext(run_as_non_root=True), None, None),  # the runtime cannot tell: not checked
        (SecurityContext(), "", None),
    ],
)
def test_run_as_non_root_follows_the_kubelet(
    security: SecurityContext, image_user: str | None, refused: str | None
) -> None:
    message = run_as_non_root_violation(security, image_user, pod=POD, container="main")
    if refused is None:
        assert message is None
    else:
        assert message is not None and message.startswith(refused)
        assert message.endswith(f'(pod: "{POD}", container: main)')


def test_limits_are_bytes_and_cores() -> None:
    assert limits({"resources": {"limits": {"memory": "64Mi", "cpu": "250m"}}}) == (64 * 1024 * 1024, 0.25)
    assert limits({"resources": {"requests": {"memory": "1Gi"}}}) == (None, None)


def test_a_token_is_renewed_at_four_fifths_of_its_lifetime() -> None:
    assert not token_refresh_due(100.0, 3600, 100.0 + 2879)
    assert token_refresh_due(100.0, 3600, 100.0 + 2880)


def test_the_kubernetes_service_variables_point_at_the_api_server() -> None:
    env = kubernetes_service_env("https://127.0.0.1:6443")
    assert env["KUBERNETES_SERVICE_HOST"] == "127.0.0.1" and env["KUBERNETES_SERVICE_PORT"] == "6443"
    assert env["KUBERNETES_PORT"] == "tcp://127.0.0.1:6443"


def spec(**fields: object) -> ContainerSpec:
    values: dict[str, object] = {"pod_namespace": "ns", "pod_name": "p", "pod_uid": "u", "name": "c",
                                 "image": "img:1", "command": [], "args": [], "env": {},
                                 "working_dir": None}  # fmt: skip
    return ContainerSpec(**(values | fields))  # type: ignore[arg-type]


def arguments(**fields: object) -> list[str]:
    runtime = PodmanRuntime(agent_id="agent", seccomp_dir=Path("/profiles"))
    return runtime.create_arguments(spec(**fields), container_name(spec(**fields)))


def test_command_replaces_the_entrypoint_and_both_expand_the_containers_variables() -> None:
    argv = arguments(command=["sh", "-c"], args=["echo $(WHO) $$(WHO) $(NOPE)"], env={"WHO": "me"})
    assert argv[argv.index("--entrypoint") + 1] == '["sh", "-c"]'
    assert argv[-3:] == ["--", "img:1", "echo me $(WHO) $(NOPE)"]
    assert "--entrypoint" not in arguments(args=["x"])  # args alone keep the image's entrypoint


def test_the_security_context_and_limits_become_podman_options() -> None:
    sc = SecurityContext(run_as_user=10001, run_as_group=10002, supplemental_groups=(10003,),
                         read_only_root_filesystem=True, allow_privilege_escalation=False,
                         capabilities_drop=("ALL",), seccomp_profile="RuntimeDefault")  # fmt: skip
    argv = " ".join(arguments(security=sc, memory_limit_bytes=1024, cpu_limit=0.5, restart_count=2, hostname="p"))
    for option in ("--user 10001:10002", "--group-add 10003", "--read-only --read-only-tmpfs=false",
                   "--security-opt no-new-privileges", "--cap-drop ALL", "--memory 1024b --memory-swap 1024b",
                   "--cpus 0.5", "--name k8s_c_p_ns_u_2", "--network host", "--pull never",
                   "--hostname p"):  # fmt: skip
        assert option in argv
    assert "seccomp=" not in argv  # RuntimeDefault: podman's own profile
    # No profile is the kubelet's Unconfined; Localhost names a file in the agent's directory.
    assert "--security-opt seccomp=unconfined" in " ".join(arguments())
    localhost = SecurityContext(seccomp_profile="Localhost", seccomp_localhost_profile="strict.json")
    assert "--security-opt seccomp=/profiles/strict.json" in " ".join(arguments(security=localhost))


def test_volumes_are_bind_mounts_read_only_where_the_mount_is() -> None:
    argv = arguments(volumes={"/tmp": Path("/state/tmp"), "/token": Path("/state/sa")},
                     read_only_mounts=frozenset({"/token"}))  # fmt: skip
    assert argv[argv.index("--volume") + 1] == "/state/tmp:/tmp:rw"
    assert "/state/sa:/token:ro" in argv
