"""The podman container runtime for the node agent: each container runs in its image, as a CRI runtime runs it.

``PodmanRuntime`` creates one podman container per container start (``podman create``, then
``podman start --attach`` as a child process whose stdout and stderr are the container's log
file, plain lines) on the host network, so 127.0.0.1 is the node's loopback: PostgreSQL and the
API server are reached there. What it enforces, from the `ContainerSpec` the agent resolved:

- the image from local storage only (``--pull never``; the agent asks `image_present` and
  `pull_image` first, as the kubelet's image manager asks CRI). No registry is reachable from
  these machines, so ``imagePullPolicy: Always`` (the API server's default for ``:latest`` and
  untagged images) fails to pull even an image that is in local storage, as a kubelet's pull would:
  give Pods ``IfNotPresent`` or ``Never`` and a tagged image;
- ``command`` as the entrypoint (``--entrypoint``, which also drops the image's cmd), ``args`` as
  the cmd, both with ``$(VAR)`` expanded from the container's environment; ``env``; ``workingDir``;
  the Pod's hostname (its own UTS namespace; the network is the host's);
- the security context: ``--user`` from ``runAsUser``/``runAsGroup`` (``runAsGroup`` alone keeps
  the image's user), ``--group-add`` for ``supplementalGroups`` and ``fsGroup``, ``--read-only``
  without podman's extra tmpfs mounts for ``readOnlyRootFilesystem`` (only volumes are
  writable, as in Kubernetes), ``no-new-privileges`` for ``allowPrivilegeEscalation: false``,
  ``--cap-drop``/``--cap-add``, ``--privileged``, and seccomp: ``RuntimeDefault`` is podman's
  default profile, ``Unconfined`` (and no profile, the kubelet's default) is unconfined,
  ``Localhost`` a file under ``<seccomp_dir>``. The default capability set is podman's
  (containers.conf), which lacks containerd's ``NET_RAW``, ``MKNOD`` and ``AUDIT_WRITE``;
- volumes as bind mounts of the agent's host directories, read-only where the mount is;
- ``resources.limits``: ``--memory`` (swap off: ``--memory-swap`` equal to it) and ``--cpus``
  (CFS quota, which cgroup v1 supports). A container the kernel's OOM killer ended reports
  `exit_reason` ``OOMKilled``: podman 4.3 with conmon 2.1 does not record it in ``State.OOMKilled``
  on this machine (conmon writes its ``oom`` marker into its working directory, which podman
  does not read), so the runtime runs ``podman start`` in a directory of the container's own and
  looks for that marker too. A container that never started (no such executable, ...) is
  ``StartError``, exit code 128, as containerd reports it;
- stopping: `terminate` is SIGTERM to the container's PID 1 (in the project's image, tini, which
  forwards it), `kill` is SIGKILL (``podman kill``); the agent waits the grace period between them;
- `exec` runs a command in the running container (``podman exec``), for exec probes.

Containers are named ``k8s_<container>_<pod>_<namespace>_<pod uid>_<restartCount>`` and labelled
with the agent that made them; each is removed once it has exited and been inspected, and
`remove_leftovers` removes whatever an earlier agent process with the same state left behind.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from pathlib import Path

from localcluster.runtime import ContainerError, ContainerSpec, ImagePullError, expand

AGENT_LABEL = "io.localcluster.agent"
START_ERROR_EXIT_CODE = 128  # containerd's exit code for a container whose process never started
PULL_TIMEOUT_SECONDS = 300.0
COMMAND_TIMEOUT_SECONDS = 120.0
KILL_WAIT_SECONDS = 10.0


def container_name(spec: ContainerSpec) -> str:
    return f"k8s_{spec.name}_{spec.pod_name}_{spec.pod_namespace}_{spec.pod_uid}_{spec.restart_count}"


def _last_error_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    line = (errors or lines or ["podman failed"])[-1]
    return line.removeprefix("Error: ")


class PodmanContainer:
    """One podman container, attached: ``podman start --attach`` is the child process."""

    def __init__(self, runtime: PodmanRuntime, name: str, popen: subprocess.Popen[bytes], run_dir: Path,
                 log_path: Path) -> None:  # fmt: skip
        self._runtime = runtime
        self.name = name
        self._popen = popen
        self._run_dir = run_dir
        self._log_path = log_path
        self._code: int | None = None
        self._reason: tuple[str, str] | None = None

    @property
    def id(self) -> str:
        return f"podman://{self.name}"

    def poll(self) -> int | None:
        if self._code is None and self._popen.poll() is not None:
            self._code = self._finish()
        return self._code

    def _finish(self) -> int:
        """Exit code and reason from podman's record of the container, then remove it."""
        inspect = self._runtime.podman("container", "inspect", self.name, check=False)
        state: dict[str, object] = {}
        if inspect.returncode == 0:
            with contextlib.suppress(ValueError, IndexError, TypeError):
                state = json.loads(inspect.stdout)[0]["State"]
        oom = bool(state.get("OOMKilled")) or (self._run_dir / "oom").exists()
        code = state.get("ExitCode")
        if not state or state.get("Status") == "created" or state.get("Error"):
            message = str(state.get("Error") or "") or _last_error_line(self._log_tail())
            self._reason = ("StartError", message)
            code = START_ERROR_EXIT_CODE
        elif oom:
            self._reason = ("OOMKilled", "")
        self._runtime.podman("rm", "--force", "--time", "0", self.name, check=False)
        shutil.rmtree(self._run_dir, ignore_errors=True)
        return int(code) if isinstance(code, int) else int(self._popen.returncode)

    def _log_tail(self) -> str:
        try:
            with self._log_path.open("rb") as log:
                log.seek(0, 2)
                log.seek(max(0, log.tell() - 4096))
                return log.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def exit_reason(self) -> tuple[str, str] | None:
        return self._reason

    def _signal(self, signal_name: str) -> None:
        if self._popen.poll() is None:
            self._runtime.podman("kill", "--signal", signal_name, self.name, check=False)

    def terminate(self) -> None:
        self._signal("TERM")

    def kill(self) -> None:
        self._signal("KILL")
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout=KILL_WAIT_SECONDS)

    def exec(self, argv: list[str], timeout: float) -> int:
        """``podman exec``: the command's exit code; `TimeoutError` when it runs longer than ``timeout``."""
        try:
            result = subprocess.run([self._runtime.executable, "exec", self.name, *argv], stdin=subprocess.DEVNULL,
                                    capture_output=True, timeout=timeout, check=False)  # fmt: skip
        except subprocess.TimeoutExpired as e:
            raise TimeoutError(f"command {argv!r} timed out after {timeout:g}s") from e
        return result.returncode


class PodmanRuntime:
    """Containers in their images with podman (see the module docstring); one agent's containers."""

    name = "podman"
    mounts_volumes = True

    def __init__(self, *, agent_id: str, seccomp_dir: Path, executable: str = "podman") -> None:
        self.agent_id = agent_id
        self.seccomp_dir = seccomp_dir
        self.executable = executable

    def podman(self, *args: str, check: bool = True, timeout: float = COMMAND_TIMEOUT_SECONDS,
               ) -> subprocess.CompletedProcess[str]:  # fmt: skip
        result = subprocess.run([self.executable, *args], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=timeout, check=False)  # fmt: skip
        if check and result.returncode != 0:
            raise ContainerError(_last_error_line(result.stderr))
        return result

    # -- images ---------------------------------------------------------------------------------------

    def image_present(self, image: str) -> bool:
        return self.podman("image", "exists", image, check=False).returncode == 0

    def pull_image(self, image: str) -> None:
        try:
            result = self.podman("pull", "--quiet", image, check=False, timeout=PULL_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired as e:
            raise ImagePullError(f"pulling {image} timed out after {PULL_TIMEOUT_SECONDS:.0f}s") from e
        if result.returncode != 0:
            raise ImagePullError(_last_error_line(result.stderr))

    def image_user(self, image: str) -> str | None:
        result = self.podman("image", "inspect", "--format", "{{.Config.User}}", image, check=False)
        return result.stdout.strip() if result.returncode == 0 else None

    # -- containers -----------------------------------------------------------------------------------

    def create_arguments(self, spec: ContainerSpec, name: str) -> list[str]:
        """``podman create`` arguments for the container (see the module docstring)."""
        sc = spec.security
        labels = {AGENT_LABEL: self.agent_id, "io.kubernetes.pod.uid": spec.pod_uid,
                  "io.kubernetes.pod.namespace": spec.pod_namespace, "io.kubernetes.pod.name": spec.pod_name,
                  "io.kubernetes.container.name": spec.name}  # fmt: skip
        argv = ["create", "--name", name, "--pull", "never", "--network", "host", "--log-driver", "none"]
        for key, value in labels.items():
            argv += ["--label", f"{key}={value}"]
        for key, value in spec.env.items():
            argv += ["--env", f"{key}={value}"]
        if spec.working_dir:
            argv += ["--workdir", spec.working_dir]
        if spec.hostname:  # its own UTS namespace on the host's network, as a Pod has
            argv += ["--hostname", spec.hostname]
        if sc.run_as_user is not None or sc.run_as_group is not None:
            user = str(sc.run_as_user) if sc.run_as_user is not None else self._image_uid(spec.image)
            argv += ["--user", user if sc.run_as_group is None else f"{user}:{sc.run_as_group}"]
        for group in sc.supplemental_groups:
            argv += ["--group-add", str(group)]
        if sc.read_only_root_filesystem:
            argv += ["--read-only", "--read-only-tmpfs=false"]
        if sc.allow_privilege_escalation is False:
            argv += ["--security-opt", "no-new-privileges"]
        if sc.privileged:
            argv += ["--privileged"]
        for capability in sc.capabilities_drop:
            argv += ["--cap-drop", capability]
        for capability in sc.capabilities_add:
            argv += ["--cap-add", capability]
        if sc.seccomp_profile == "Localhost":
            argv += ["--security-opt", f"seccomp={self.seccomp_dir / str(sc.seccomp_localhost_profile)}"]
        elif sc.seccomp_profile != "RuntimeDefault" and not sc.privileged:
            argv += ["--security-opt", "seccomp=unconfined"]
        if spec.memory_limit_bytes is not None:
            argv += ["--memory", f"{spec.memory_limit_bytes}b", "--memory-swap", f"{spec.memory_limit_bytes}b"]
        if spec.cpu_limit is not None:
            argv += ["--cpus", f"{spec.cpu_limit:g}"]
        for mount_path, host_dir in spec.volumes.items():
            mode = "ro" if mount_path in spec.read_only_mounts else "rw"
            argv += ["--volume", f"{host_dir}:{mount_path}:{mode}"]
        if spec.command:
            argv += ["--entrypoint", json.dumps([expand(a, spec.env) for a in spec.command])]
        argv += ["--", spec.image, *(expand(a, spec.env) for a in spec.args)]
        return argv

    def _image_uid(self, image: str) -> str:
        return (self.image_user(image) or "").split(":", 1)[0] or "0"

    def start(self, spec: ContainerSpec) -> PodmanContainer:
        name = container_name(spec)
        # A container of this name is what an earlier agent process left behind at the same restart count.
        self.podman("rm", "--force", "--time", "0", name, check=False)
        self.podman(*self.create_arguments(spec, name))
        run_dir = spec.log_path.with_suffix(".run")
        run_dir.mkdir(parents=True, exist_ok=True)
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        with spec.log_path.open("ab") as log:
            popen = subprocess.Popen(
                [self.executable, "start", "--attach", name],
                cwd=run_dir,  # where conmon leaves its OOM marker
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return PodmanContainer(self, name, popen, run_dir, spec.log_path)

    def remove_leftovers(self) -> list[str]:
        """Remove every container an earlier process of this agent left (it was killed, or crashed)."""
        listed = self.podman("ps", "--all", "--quiet", "--filter", f"label={AGENT_LABEL}={self.agent_id}", check=False)
        ids = listed.stdout.split()
        if ids:
            self.podman("rm", "--force", "--time", "0", *ids, check=False)
        return ids
