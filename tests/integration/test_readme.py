"""The README's local-mode commands, run exactly as written against a real PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.readme import readme_commands

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_the_block_holds_the_documented_contract() -> None:
    commands = readme_commands("local")
    assert any(c.startswith("python -m scripts.run_dbt_backfill") and "--tenant-id" in c for c in commands)
    assert any("--models staging+ facts+" in c for c in commands)
    assert any(c.startswith("dbt-backfill history") for c in commands)


def test_every_local_command_in_the_readme_works(database_url: str) -> None:
    # The commands name `python` and `dbt-backfill`; resolve both to this interpreter's environment.
    env = os.environ | {
        "DATABASE_URL": database_url,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    outputs = {}
    for command in readme_commands("local"):
        result = subprocess.run(
            ["bash", "-c", command], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
        )
        assert result.returncode == 0, f"{command!r} failed ({result.returncode}):\n{result.stderr[-3000:]}"
        outputs[command] = result.stdout + result.stderr
    assert "completed" in outputs["dbt-backfill history"]
    assert (
        "window(s)"
        in outputs["python -m scripts.run_dbt_backfill --start-date 2024-01-01 --end-date 2024-02-29 --chunk week"]
    )
