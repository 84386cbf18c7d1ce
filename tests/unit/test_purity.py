"""The pure core imports nothing heavy: no kopf, kubernetes, SQLAlchemy or dbt.

Each module is imported in a fresh interpreter, so what another test imported earlier in
this session cannot hide (or fake) a dependency.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PURE_MODULES = (
    "core.planner",
    "core.spec",
    "operator.jobs",
    "operator.reconcile",
    "operator.status",
    "core.cost",
    "runner.compiled",
    "runner.contract_check",
    "operator.policy",
    "operator.pod_start",
    "runner.window_tests",
    "runner.parse_key",
    "operator.queue_admission",
    "operator.queue_status",
    "kubectl.calendar_view",
)
FORBIDDEN = ("kopf", "kubernetes", "sqlalchemy", "dbt")

PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(sys.modules)))
"""


def _probe(module: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", PROBE, module], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _result(process: subprocess.Popen[str]) -> list[str]:
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    modules: list[str] = json.loads(out)
    return modules


@pytest.fixture(scope="module")
def imported() -> dict[str, list[str]]:
    """sys.modules after importing each module alone; the interpreters run side by side."""
    names = [f"dbtbackfill.{n}" for n in PURE_MODULES] + ["dbtbackfill.core.audit"]
    processes = {name: _probe(name) for name in names}
    return {name: _result(process) for name, process in processes.items()}


@pytest.mark.parametrize("name", PURE_MODULES)
def test_pure_module_imports_no_framework(name: str, imported: dict[str, list[str]]) -> None:
    modules = imported[f"dbtbackfill.{name}"]
    assert f"dbtbackfill.{name}" in modules  # the probe really imported it
    heavy = sorted(m for m in modules if m.split(".")[0] in FORBIDDEN)
    assert heavy == [], f"dbtbackfill.{name} pulls in {heavy[:10]}"


def test_probe_detects_a_forbidden_import(imported: dict[str, list[str]]) -> None:
    # The check itself works: a module known to need SQLAlchemy is caught.
    modules = imported["dbtbackfill.core.audit"]
    assert any(m.split(".")[0] == "sqlalchemy" for m in modules)
