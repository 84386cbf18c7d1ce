"""The real image, built with podman (``make image``), and a way to run commands in it.

Nothing is mocked: the image is the one ``deploy/image/build.sh`` builds (the fixture calls it,
which returns at once when the image is up to date with the build context), and containers run
with podman, read-only, as the image's user, on the host network so they reach the tests'
PostgreSQL on loopback.
"""

from __future__ import annotations

import hashlib
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


# The recipe for an image of one's own project, built from tests/projects/shop on top of ``image``.
OWN_PROJECT_DOCKERFILE = REPO_ROOT / "deploy" / "examples" / "own-project" / "Dockerfile"
#: The build arguments of the shop's image: the database and schema its chunks write to (the parse is for them).
SHOP_BUILD_ARGS = {"PROJECT": "projects/shop", "PARSE_DATABASE": "shop_image", "SCHEMA": "jaffle"}


def _image_id(image: str) -> str:
    out = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{.Id}}", image],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return out.stdout.strip()


def _context_digest(context: Path, *parts: str) -> str:
    digest = hashlib.sha256("\0".join(parts).encode())
    for path in sorted(p for p in context.rglob("*") if p.is_file()):
        digest.update(path.relative_to(context).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def shop_image(image: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """deploy/examples/own-project/Dockerfile built as its README section says, from tests/projects/shop.

    The context holds the shop and its local package shop_utils in the repository's layout
    (projects/shop, projects/shop_utils), so the shop's packages.yml finds dbt_backfill at
    /app/dbt-package (``../../../dbt-package`` from /app/workspace/projects/shop). The tag follows
    the operator image's (one per branch, so parallel runs elsewhere never share it); the image is
    labelled with a hash of the operator image, the recipe, the build arguments and the context,
    and one already labelled so is this very build (skipped). Otherwise podman's layer cache keeps
    a rebuild to the steps after what changed.
    """
    from tests.integration.conftest import copy_tracked

    context = tmp_path_factory.mktemp("own-project-context")
    for part in ("shop", "shop_utils"):
        copy_tracked(REPO_ROOT / "tests" / "projects" / part, context / "projects" / part)
    args = [f"{key}={value}" for key, value in SHOP_BUILD_ARGS.items()]
    digest = _context_digest(context, _image_id(image), OWN_PROJECT_DOCKERFILE.read_text(), *args)
    tag = f"localhost/dbt-backfill-own-project:shop-{image.rsplit(':', 1)[-1]}"
    label = "io.dbt-backfill.build-context"
    found = subprocess.run(
        ["podman", "image", "inspect", "--format", f'{{{{index .Labels "{label}"}}}}', tag],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if found.returncode == 0 and found.stdout.strip() == digest:
        return tag
    argv = ["podman", "build", "--pull=never", "--network", "none", "--layers", "--file", str(OWN_PROJECT_DOCKERFILE)]
    for arg in [f"OPERATOR_IMAGE={image}", *args]:
        argv += ["--build-arg", arg]
    build = subprocess.run(
        [*argv, "--label", f"{label}={digest}", "--tag", tag, str(context)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return tag


@pytest.fixture(scope="session")
def shop_container(shop_image: str) -> Container:
    return Container(shop_image)
