"""`dbt-backfill operator` as its own process: what the e2e tests and the cluster benchmarks run.

A subprocess rather than an in-process kopf, so a test can SIGKILL it and start it again, and a
benchmark can read its RSS and CPU time from /proc.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Watches the API server ends every 30 s: a test sees its streams re-established, not only their first minutes.
SHORT_WATCHES = {"DBT_BACKFILL_WATCH_TIMEOUT_SECONDS": "30"}


class OperatorProcess:
    """The operator watching ``scope`` (``--namespace NS`` or ``--all-namespaces``), logged in with
    ``kubeconfig``, its chunk Jobs running ``image``; each start logs to ``<log_name>-<n>.log``."""

    def __init__(
        self,
        kubeconfig: Path,
        database_url: str,
        image: str,
        log_dir: Path,
        scope: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_name: str = "operator",
    ) -> None:
        self.env = os.environ | {
            "KUBECONFIG": str(kubeconfig),
            "DATABASE_URL": database_url,
            "DBT_BACKFILL_DEFAULT_IMAGE": image,
            **(env or {}),
        }
        self.log_dir = log_dir
        self.scope = list(scope)
        self.log_name = log_name
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        with (self.log_dir / f"{self.log_name}-{self.starts}.log").open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dbtbackfill.cli", "operator", *self.scope, "--liveness-port", "0",
                 "--metrics-port", "0"],
                cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def logs(self) -> str:
        """Every start's log, oldest first."""
        logs = sorted(self.log_dir.glob(f"{self.log_name}-*.log"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
        return "\n".join(p.read_text(errors="replace") for p in logs)

    def memory_kib(self) -> dict[str, int]:
        """VmRSS (now) and VmHWM (peak RSS so far) of the running process, from /proc."""
        if self.process is None or self.process.poll() is not None:
            return {}
        try:
            lines = Path(f"/proc/{self.process.pid}/status").read_text().splitlines()
        except OSError:
            return {}
        return {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in lines) if k in ("VmRSS", "VmHWM")}

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the running process so far, from /proc."""
        if self.process is None or self.process.poll() is not None:
            return None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 2)
