"""Long-running local processes tracked by pid files, so a later command can find and stop them.

A pid file holds the pid and the exact command line; a process counts as ours only while
``/proc/<pid>/cmdline`` still matches it, so a recycled pid is never signalled.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent dies (test sessions leave no orphans)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.decode(errors="replace").split("\0")[:-1] if raw else None


class ManagedProcess:
    """One named process with ``<state>/<name>.pid`` and its output in ``<state>/logs/<name>.log``."""

    def __init__(self, name: str, state_dir: Path) -> None:
        self.name = name
        self.pid_file = state_dir / f"{name}.pid"
        self.log_file = state_dir / "logs" / f"{name}.log"
        self._popen: subprocess.Popen[bytes] | None = None

    def pid(self) -> int | None:
        """The pid if the process recorded in the pid file is still alive and still the same command."""
        if self._popen is not None and self._popen.poll() is not None:
            return None  # reaped: our child has exited
        try:
            pid_text, *argv = self.pid_file.read_text().split("\0")
        except (OSError, ValueError):
            return None
        if not pid_text.isdigit():
            return None
        pid = int(pid_text)
        return pid if _cmdline(pid) == argv else None

    def alive(self) -> bool:
        return self.pid() is not None

    def start(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        die_with_parent: bool = False,
    ) -> int:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        preexec: Callable[[], None] | None = _die_with_parent if die_with_parent else None
        with self.log_file.open("ab") as log:
            self._popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,  # Ctrl-C in the shell that ran `up` must not reach it
                preexec_fn=preexec,  # only prctl, which is async-signal-safe
            )
        # /proc/<pid>/cmdline shows the argv after exec; wait for it so the pid file matches.
        deadline = time.monotonic() + 10
        while (line := _cmdline(self._popen.pid)) != list(argv) and time.monotonic() < deadline:
            if self._popen.poll() is not None:
                break
            time.sleep(0.01)
        self.pid_file.write_text("\0".join([str(self._popen.pid), *(line or argv)]))
        return self._popen.pid

    def exit_code(self) -> int | None:
        """The exit status if this object started the process and it has exited."""
        return None if self._popen is None else self._popen.poll()

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; removes the pid file."""
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while not self._exited(pid):
                if time.monotonic() >= deadline:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    break
                time.sleep(0.05)
            if self._popen is not None:
                self._popen.wait(10)  # reap our child
        self.pid_file.unlink(missing_ok=True)

    def _exited(self, pid: int) -> bool:
        if self._popen is not None and self._popen.pid == pid:
            return self._popen.poll() is not None
        # Not our child: gone once /proc has no live process of that command (a zombie's cmdline is empty).
        return self.pid() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
