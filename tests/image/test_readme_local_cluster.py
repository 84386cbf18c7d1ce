"""README "Try it on a local control plane": its commands, run as written, one after another.

Nothing is mocked or skipped: ``make cluster-up`` starts a real control plane and the podman node,
``make image`` builds (or finds up to date) the image, ``make demo-db`` a real PostgreSQL with the
demo data, and the kubectl lines install the operator and run the sample backfill in containers.

They run in a copy of the repository's files (``git ls-files``), so the ``.cluster/`` and ``.demo/``
the commands create are the copy's and never a developer's own; make uses this checkout's
virtualenv (``VENV``), and the copy keeps the files' times so it is not reinstalled. Each command
runs in bash with the variables the commands before it exported (``export``, ``source``), as in
one terminal. Two commands cannot run as written in a test, and are run so:

- ``kubectl get dbf -w`` never ends by itself: it runs until its output shows the backfill
  ``Succeeded`` (as a user watches it, then presses Ctrl-C), then it is stopped;
- when ``$IMAGE`` names another tag than the overlay's (helpers that share one podman storage
  build their own), the copy's overlay names that image; in CI it is the overlay as written.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.image.conftest import LOCAL_OVERLAY, overlay_image, with_image
from tests.support.polling import wait_for
from tests.support.readme import readme_commands

pytestmark = [pytest.mark.image, pytest.mark.e2e, pytest.mark.integration]

BLOCK = "local-cluster"
SAMPLE = "backfill-2024-01-first-days"


def copy_of_the_repository(destination: Path) -> Path:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT, capture_output=True, check=True, timeout=60,
    ).stdout.decode()  # fmt: skip
    for rel in filter(None, listed.split("\0")):
        source = REPO_ROOT / rel
        if source.is_file():  # a deleted, not yet committed file is listed too
            (destination / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / rel)  # times kept: make sees the venv as up to date
    return destination


def use_image(copy: Path, image: str) -> None:
    path = copy / LOCAL_OVERLAY.relative_to(REPO_ROOT) / "kustomization.yaml"
    if overlay_image(yaml.safe_load(path.read_text())) != image:
        path.write_text(yaml.safe_dump(with_image(path, image)))


class Terminal:
    """One shell session: each command sees what the earlier ones exported."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd, self.env = cwd, env
        self.state = cwd / ".readme-test-env"
        self.state.write_text("")

    def script(self, command: str) -> str:
        return f"source {self.state}\n{command}\nrc=$?\nexport -p > {self.state}\nexit $rc\n"

    def run(self, command: str, timeout: float = 1800) -> str:
        result = subprocess.run(
            ["bash", "-c", self.script(command)], cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{command!r} exited {result.returncode}:\n{output[-4000:]}"
        return output

    def watch_until(self, command: str, done: re.Pattern[str], timeout: float = 900) -> str:
        """Run a command that never ends (``-w``) until its output matches ``done``, then stop it."""
        out = self.cwd / ".readme-test-watch"
        with out.open("w") as sink:
            process = subprocess.Popen(
                ["bash", "-c", self.script(command)], cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        try:
            wait_for(lambda: done.search(out.read_text()) or process.poll() is not None, timeout=timeout,
                     interval=0.5, message=lambda: out.read_text()[-3000:])  # fmt: skip
            assert process.poll() is None, f"{command!r} ended by itself ({process.returncode}):\n{out.read_text()}"
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C sends
                process.wait(30)
        return out.read_text()


@pytest.fixture
def terminal(image: str) -> Iterator[Terminal]:
    copy = copy_of_the_repository(Path(tempfile.mkdtemp(prefix="readme-local-cluster-")))
    use_image(copy, image)
    env = os.environ | {"VENV": str(REPO_ROOT / ".venv"), "IMAGE": image}
    env.pop("KUBECONFIG", None)
    shell = Terminal(copy, env)
    try:
        yield shell
    finally:
        # Whatever the block got to: stop its cluster and its PostgreSQL, then remove the copy.
        for target in ("cluster-down", "demo-db-down"):
            subprocess.run(["make", "-s", target], cwd=copy, env=env, capture_output=True, timeout=300, check=False)
        shutil.rmtree(copy, ignore_errors=True)


def test_the_block_installs_the_overlay_and_runs_a_sample() -> None:
    commands = readme_commands(BLOCK)
    expected = ["make cluster-up", "make image", "make demo-db", "kubectl apply -k deploy/overlays/local",
                "kubectl apply -f deploy/examples/backfill-first-days.yaml"]  # fmt: skip
    positions = [next(i for i, c in enumerate(commands) if c.startswith(e)) for e in expected]
    assert positions == sorted(positions)
    secrets = [c for c in commands if " create secret generic " in c]
    assert len(secrets) == 3  # the audit database twice (operator, backfill namespace), the warehouse
    assert any("label secret analytics-warehouse dbt-backfill.io/warehouse=true" in c for c in commands)
    assert any(re.search(r"get dbf -w\b", c) for c in commands)


def test_every_command_of_the_local_cluster_block_works(terminal: Terminal) -> None:
    outputs: dict[str, str] = {}
    for command in readme_commands(BLOCK):
        if re.search(r"\s-w(\s|$)", command):
            done = re.compile(rf"^{SAMPLE}\s+Succeeded\s+3/3\b", re.M)
            outputs[command] = terminal.watch_until(command, done)
        else:
            outputs[command] = terminal.run(command)

    def output_of(prefix: str) -> str:
        return next(out for command, out in outputs.items() if command.startswith(prefix))

    assert "successfully rolled out" in output_of("kubectl -n dbt-backfill-system rollout status")
    chunk_log = output_of("kubectl -n analytics logs -l")
    assert "2024-01-01..2024-01-01" in chunk_log and "completed" in chunk_log, chunk_log[-3000:]
    operator_log = output_of("kubectl -n dbt-backfill-system logs")
    assert SAMPLE in operator_log, operator_log[-3000:]
