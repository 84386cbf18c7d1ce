"""The package layout: imports point one way, nothing imports in a circle, no class is too long.

``operator/dbtbackfill`` has one package per part of the data flow (see its ``__init__.py``)::

    entry points (cli, kubectl)  ->  demo  ->  runner | operator  ->  core

Each module's imports are read from its source (``ast``: module-level, inside functions and under
``TYPE_CHECKING`` alike), so a lazy import cannot hide a dependency. What ships in the wheel is
checked from pyproject's own settings: every module is in a package, and the Alembic migrations
(found next to ``core/audit.py`` at run time) are package data.
"""

from __future__ import annotations

import ast
import fnmatch
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "operator" / "dbtbackfill"
MAX_CLASS_LINES = 120

#: What each layer may import besides itself. ``dbtbackfill`` (the root ``__init__``) holds only
#: ``__version__``, so every layer may read it. runner and operator never import each other.
ALLOWED: Mapping[str, frozenset[str]] = {
    "entry": frozenset({"demo", "runner", "operator", "core", "root"}),
    "demo": frozenset({"runner", "core", "root"}),
    "runner": frozenset({"core", "root"}),
    "operator": frozenset({"core", "root"}),
    "core": frozenset({"root"}),
    "root": frozenset(),
}
SUBPACKAGES = {"core": "core", "runner": "runner", "operator": "operator", "demo": "demo", "kubectl": "entry"}


def layer(module: str) -> str | None:
    """The layer of ``dbtbackfill...`` module ``module``; None for a module outside every layer."""
    parts = module.split(".")
    if parts == ["dbtbackfill"]:
        return "root"
    if parts == ["dbtbackfill", "cli"]:
        return "entry"
    return SUBPACKAGES.get(parts[1]) if len(parts) > 2 or parts[1] in SUBPACKAGES else None


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, known: set[str]) -> set[str]:
    """The ``dbtbackfill`` modules ``source`` imports (``from pkg import mod`` names the module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "dbtbackfill")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "dbtbackfill":
                continue
            submodules = {f"{node.module}.{a.name}" for a in node.names} & known
            found.update(submodules if len(submodules) == len(node.names) else {node.module, *submodules})
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    known = set(files)
    return {name: imports_of(path.read_text(), known) - {name} for name, path in files.items()}


def layer_violations(graph: Mapping[str, Iterable[str]]) -> list[str]:
    out: list[str] = []
    for module, targets in sorted(graph.items()):
        own = layer(module)
        if own is None:
            out.append(f"{module} is in no layer: put it in one of {sorted(SUBPACKAGES)} (or make it cli)")
            continue
        for target in sorted(targets):
            theirs = layer(target)
            if theirs is not None and theirs != own and theirs not in ALLOWED[own]:
                out.append(f"{module} ({own}) imports {target} ({theirs})")
    return out


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group: list[str] = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def long_classes(root: Path, limit: int = MAX_CLASS_LINES) -> list[str]:
    out: list[str] = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                lines = (node.end_lineno or node.lineno) - first + 1
                if lines > limit:
                    out.append(f"{path.relative_to(root.parent)}: class {node.name} has {lines} lines")
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(PACKAGE)


def test_the_graph_sees_the_packages_imports(graph: dict[str, set[str]]) -> None:
    # Guards the other tests against reading nothing: known edges of each kind are found.
    assert "dbtbackfill.runner.session" in graph["dbtbackfill.cli"]  # from dbtbackfill.runner import session
    assert "dbtbackfill.core.planner" in graph["dbtbackfill.operator.jobs"]  # from ... import names
    assert "dbtbackfill.demo.run" in graph["dbtbackfill.cli"]  # inside a function
    assert {layer(m) for m in graph} == set(ALLOWED)


def test_imports_point_down_the_layers(graph: dict[str, set[str]]) -> None:
    assert layer_violations(graph) == []


def test_no_import_cycle(graph: dict[str, set[str]]) -> None:
    assert cycles(graph) == []


def test_no_class_is_longer_than_the_limit() -> None:
    assert long_classes(PACKAGE) == []


def test_the_checks_catch_what_they_forbid(tmp_path: Path) -> None:
    # The same functions on a small package that breaks every rule once.
    root = tmp_path / "dbtbackfill"
    sources = {
        "__init__.py": "",
        "cli.py": "from dbtbackfill.demo import run\n",
        "stray.py": "",
        "core/__init__.py": "",
        "core/plan.py": "def f():\n    from dbtbackfill.runner import engine\n",  # upward, lazily
        "runner/__init__.py": "",
        "runner/engine.py": "from dbtbackfill.operator.jobs import X\n",  # sideways
        "operator/__init__.py": "",
        "operator/jobs.py": "import dbtbackfill.operator.status\n",
        "operator/status.py": "from dbtbackfill.operator import jobs\n",  # a cycle
        "demo/__init__.py": "",
        "demo/run.py": "from dbtbackfill import cli\n",  # up to the entry point, and a cycle
    }
    for rel, text in sources.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "core" / "big.py").write_text("class Big:\n" + "    x = 1\n" * MAX_CLASS_LINES)
    (root / "core" / "fits.py").write_text("class Fits:\n" + "    x = 1\n" * (MAX_CLASS_LINES - 1))
    graph = import_graph(root)
    assert layer_violations(graph) == [
        "dbtbackfill.core.plan (core) imports dbtbackfill.runner.engine (runner)",
        "dbtbackfill.demo.run (demo) imports dbtbackfill.cli (entry)",
        "dbtbackfill.runner.engine (runner) imports dbtbackfill.operator.jobs (operator)",
        "dbtbackfill.stray is in no layer: put it in one of ['core', 'demo', 'kubectl', 'operator', 'runner'] "
        "(or make it cli)",
    ]
    assert cycles(graph) == [
        ["dbtbackfill.cli", "dbtbackfill.demo.run"],
        ["dbtbackfill.operator.jobs", "dbtbackfill.operator.status"],
    ]
    assert long_classes(root) == [f"dbtbackfill/core/big.py: class Big has {MAX_CLASS_LINES + 1} lines"]


def test_every_subpackage_says_what_it_holds_and_may_import() -> None:
    for name in SUBPACKAGES:
        init = PACKAGE / name / "__init__.py"
        tree = ast.parse(init.read_text())
        doc = ast.get_docstring(tree) or ""
        assert "import" in doc, f"{init} does not say what it may import"
        # Nothing but the docstring: importing a pure module must not pull in its siblings.
        assert len(tree.body) == 1, f"{init} holds code"


def test_the_wheel_ships_every_module_and_the_migrations() -> None:
    # What setuptools puts in the wheel, from pyproject's own settings: packages (a directory
    # of modules needs an __init__.py) plus package data (the Alembic migrations, which
    # core/audit.py finds next to itself).
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["packages"]["find"]["where"] == ["operator"]
    data = config["package-data"]["dbtbackfill"]
    for path in sorted(PACKAGE.rglob("*")):
        rel = path.relative_to(PACKAGE).as_posix()
        if path.suffix != ".py" and path.name != "py.typed":  # e.g. Alembic's revision template
            continue
        in_package = (path.parent / "__init__.py").is_file() and path.suffix == ".py"
        as_data = any(fnmatch.fnmatch(rel, pattern) for pattern in data)
        assert in_package or as_data, f"{rel} would not be in the wheel"
    versions = sorted((PACKAGE / "core" / "migrations" / "versions").glob("*.py"))
    assert versions, "no migrations found next to core/audit.py"
    assert all(any(fnmatch.fnmatch(v.relative_to(PACKAGE).as_posix(), p) for p in data) for v in versions)
