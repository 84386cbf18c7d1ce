"""Container runtimes for the node agent: the seam between the kubelet's logic and a process.

The node agent decides *what* runs (argv, environment, volumes, when to stop); a runtime starts
and signals one container. `HostProcessRuntime` runs a container as a process on this host; a
container-engine runtime (podman) implements the same two classes.

Host processes cannot have their own mount namespace, user or root filesystem, so the host runtime
approximates a container as follows, and only this far:

- *Images* are JSON files ``<images_dir>/<image>.json`` (``/`` and ``:`` in the name become ``_``)
  with optional ``entrypoint``, ``cmd`` (lists), ``env`` (object) and ``workingDir``, the parts of an
  OCI image config that matter to a process. An image without a file is the host itself: no
  entrypoint, the runtime's working directory and ``PATH``.
- The command is resolved as Kubernetes does: ``command`` replaces the entrypoint, ``args`` replace
  ``cmd``.
- *Volumes* are host directories. Since nothing is mounted, a path under a volume's ``mountPath`` in
  the command (a whole argument) or in one of the pod's environment values is rewritten to that
  directory, and a volume mounted at ``/tmp`` becomes ``TMPDIR``.
- The environment is only what the image and the pod define, plus ``PATH``, ``HOSTNAME`` and a
  ``HOME`` (the pod's own directory) when neither sets one: the agent's own environment never leaks in.
- ``securityContext`` (user, read-only root, capabilities) and resources are not enforced.
- An exec probe's command (`RunningContainer.exec`) runs as another host process with the
  container's environment and working directory, its paths under a volume rewritten as above, in a
  session of its own (it is not in the container's process group, and its output is discarded).
- Stopping sends the signal to the container's main process (what a runtime sends to PID 1); a kill
  is SIGKILL to its whole process group (what stopping a container's cgroup does).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

_VAR_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\$")


def expand(text: str, variables: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: known references are replaced, ``$$`` escapes ``$``."""

    def replace(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        return variables.get(match[1], match[0])

    return _VAR_REFERENCE.sub(replace, text)


@dataclass(frozen=True)
class ContainerSpec:
    """One container, resolved by the node agent: what the runtime needs and nothing else."""

    pod_namespace: str
    pod_name: str
    pod_uid: str
    name: str
    image: str
    command: list[str]  # the pod's `command`, not yet expanded; empty: the image's entrypoint
    args: list[str]  # the pod's `args`; empty (and no command): the image's cmd
    env: dict[str, str]  # the pod's env, resolved (Secrets, ConfigMaps, fields) in order
    working_dir: str | None
    volumes: dict[str, Path] = field(default_factory=dict)  # mountPath -> host directory
    log_path: Path = Path(os.devnull)


class ContainerError(Exception):
    """The runtime could not create or start the container (kubelet reason CreateContainerError)."""


class RunningContainer(Protocol):
    @property
    def id(self) -> str: ...

    def poll(self) -> int | None:
        """The exit code once it has exited (128 + signal number if a signal ended it), else None."""

    def terminate(self) -> None:
        """Ask the container to stop (SIGTERM to its main process)."""

    def kill(self) -> None:
        """Stop it now (SIGKILL to every process in it)."""

    def exec(self, argv: list[str], timeout: float) -> int:
        """Run ``argv`` in the container (an exec probe) and return its exit code.

        Raises TimeoutError (after killing it) when it runs longer than ``timeout`` seconds.
        """


class ContainerRuntime(Protocol):
    name: str

    def start(self, spec: ContainerSpec) -> RunningContainer: ...


class HostProcess:
    """A container that is a process group on this host."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        remap: Callable[[str], str] = str,
    ) -> None:
        self._popen = popen
        self._env = env or {}
        self._cwd = cwd
        self._remap = remap

    @property
    def id(self) -> str:
        return f"host://{self._popen.pid}"

    @property
    def pid(self) -> int:
        return self._popen.pid

    def poll(self) -> int | None:
        code = self._popen.poll()
        if code is None:
            return None
        if code < 0:
            # Reap what the main process left behind in its group, as a stopped cgroup would.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._popen.pid, signal.SIGKILL)
            return 128 - code
        return code

    def terminate(self) -> None:
        if self._popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._popen.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._popen.pid, signal.SIGKILL)

    def exec(self, argv: list[str], timeout: float) -> int:
        try:
            process = subprocess.Popen(
                [self._remap(a) for a in argv],
                cwd=self._cwd,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except FileNotFoundError:
            return 127  # what a shell, and an OCI runtime's exec, answer for a missing command
        except OSError:
            return 126
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise TimeoutError(f"{argv[0]} ran longer than {timeout:g} s") from None
        return 128 - code if code < 0 else code


@dataclass(frozen=True)
class HostImage:
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    working_dir: str | None = None


def image_file(images_dir: Path, image: str) -> Path:
    return images_dir / (re.sub(r"[/:@]", "_", image) + ".json")


class HostProcessRuntime:
    """Runs each container as a process in its own session on this host (see the module docstring)."""

    name = "host"

    def __init__(self, *, images_dir: Path, working_dir: Path, path: str) -> None:
        self.images_dir = images_dir
        self.working_dir = working_dir
        self.path = path

    def image(self, name: str) -> HostImage:
        file = image_file(self.images_dir, name)
        if not file.exists():
            return HostImage()
        try:
            data = json.loads(file.read_text())
            return HostImage(
                entrypoint=[str(a) for a in data.get("entrypoint") or []],
                cmd=[str(a) for a in data.get("cmd") or []],
                env={str(k): str(v) for k, v in (data.get("env") or {}).items()},
                working_dir=data.get("workingDir"),
            )
        except (ValueError, AttributeError, TypeError) as e:
            raise ContainerError(f"image {name}: unreadable {file}: {e}") from e

    def start(self, spec: ContainerSpec) -> RunningContainer:
        image = self.image(spec.image)

        def remap(value: str) -> str:
            for mount_path in sorted(spec.volumes, key=len, reverse=True):
                prefix = mount_path.rstrip("/")
                if value == mount_path or value.startswith(prefix + "/"):
                    return str(spec.volumes[mount_path]) + value[len(prefix) :]
            return value

        env = {"PATH": self.path, "HOSTNAME": spec.pod_name}
        env |= image.env  # paths in the image's own config are host paths here: not remapped
        if "/tmp" in spec.volumes:  # noqa: S108  # the pod's /tmp, not the host's
            env["TMPDIR"] = str(spec.volumes["/tmp"])  # noqa: S108
        env |= {key: remap(value) for key, value in spec.env.items()}
        env.setdefault("HOME", str(spec.log_path.parent))
        if spec.command:
            argv = [expand(a, env) for a in spec.command] + [expand(a, env) for a in spec.args]
        else:
            argv = image.entrypoint + ([expand(a, env) for a in spec.args] if spec.args else image.cmd)
        argv = [remap(a) for a in argv]
        if not argv:
            raise ContainerError(f"image {spec.image!r} has no entrypoint and the container no command")
        # Only the Pod's own paths live in its volumes; the image's and the runtime's are host paths
        # (a checkout under /tmp must not turn into the Pod's /tmp emptyDir).
        working_dir = Path(remap(spec.working_dir)) if spec.working_dir else Path(image.working_dir or self.working_dir)
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        with spec.log_path.open("ab") as log:
            try:
                popen = subprocess.Popen(
                    argv,
                    cwd=working_dir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as e:
                raise ContainerError(f"failed to start container {spec.name!r}: {argv[0]}: {e.strerror}") from e
        return HostProcess(popen, env=env, cwd=working_dir, remap=remap)
