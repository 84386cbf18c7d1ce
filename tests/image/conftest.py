"""The real image, built with podman (``make image``), and a way to run commands in it.

Nothing is mocked: the image is the one ``deploy/image/build.sh`` builds (the fixture calls it,
which returns at once when the image is up to date with the build context), and containers run
with podman, read-only, as the image's user, on the host network so they reach the tests'
PostgreSQL on loopback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO_ROOT

IMAGE = os.environ.get("IMAGE", "localhost/dbt-backfill-operator:dev")
LOCAL_OVERLAY = REPO_ROOT / "deploy" / "overlays" / "local"


def overlay_image(kustomization: dict[str, Any]) -> str:
    (entry,) = kustomization["images"]
    return f"{entry['newName']}:{entry['newTag']}"


def with_image(kustomization_file: Path, image: str) -> dict[str, Any]:
    """deploy/overlays/local's kustomization (or a copy's) with its one image set to ``image``.

    Helpers sharing one podman storage build their own tag (``$IMAGE``); in CI it is the same.
    """
    kustomization: dict[str, Any] = yaml.safe_load(kustomization_file.read_text())
    (entry,) = kustomization["images"]
    entry["newName"], _, entry["newTag"] = image.rpartition(":")
    return kustomization


@pytest.fixture(scope="session")
def image() -> str:
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: the image tests need it (.ci/run installs it)")
    build = subprocess.run(
        [str(REPO_ROOT / "deploy" / "image" / "build.sh")],
        cwd=REPO_ROOT,
        env={**os.environ, "IMAGE": IMAGE},
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return IMAGE


@dataclass(frozen=True)
class Container:
    image: str

    def run(
        self,
        *command: str,
        env: dict[str, str] | None = None,
        user: str | None = "10001:10001",
        extra: Sequence[str] = (),
        timeout: float = 300,
    ) -> subprocess.CompletedProcess[str]:
        """``podman run`` as the chunk Jobs run: read-only root, /tmp an emptyDir-like tmpfs."""
        argv = ["podman", "run", "--rm", "--network", "host", "--read-only", "--tmpfs", "/tmp"]
        if user is not None:
            argv += ["--user", user]
        for key, value in (env or {}).items():
            argv += ["--env", f"{key}={value}"]
        argv += [*extra, self.image, *command]
        return subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, check=False
        )


@pytest.fixture(scope="session")
def container(image: str) -> Container:
    return Container(image)
