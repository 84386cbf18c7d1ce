"""The compiled engine's inputs: dbt compiles the models, and their data tests, once for every
window, with the window as ``$1``/``$2`` (:func:`~dbtbackfill.runner.compiled.compiled_vars`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dbtbackfill.runner.compiled import CompiledWindows, NotCompilable, compiled_vars, plan_models
from dbtbackfill.runner.invocation import DbtInvocation, RunnerError
from dbtbackfill.runner.manifest import ProjectManifest, copy_manifest, model_node
from dbtbackfill.runner.results import error_text, node_label
from dbtbackfill.runner.window_tests import WindowTests, attached_tests, scope, window_test


@dataclass
class CompileOnce:
    """One session's compile-once invocations, and the last compiled models kept for the next use."""

    manifest: ProjectManifest
    dbt: DbtInvocation
    #: The last :meth:`params`, kept for the next :meth:`windows` of the same models.
    _params_compiled: tuple[tuple[str | None, tuple[str, ...]], list[Any]] | None = None

    def windows(
        self, connect: dict[str, str], tenant_id: str | None, models: Sequence[str], verify: WindowTests | None
    ) -> CompiledWindows:
        """Compile ``models`` once for every window and prepare their statements.

        Raises :class:`NotCompilable` (with the reason) when a model is outside the backfill
        contract, a table does not exist yet, or a schema changed: those windows need dbt itself.
        """
        hooks = sorted(n.name for n in self.manifest.require().nodes.values() if n.resource_type == "operation")
        if hooks:
            raise NotCompilable(f"the project has on-run-start/on-run-end hooks ({', '.join(hooks)})")
        cached, self._params_compiled = self._params_compiled, None
        if cached is not None and cached[0] == (tenant_id, tuple(models)):
            compiled = cached[1]
        else:
            compiled = self.params(tenant_id, models)
            self._params_compiled = None
        nodes = [model_node(n, self.manifest.require().nodes) for n in compiled]
        checks = verify.in_transaction if verify is not None and verify.tests else None
        # The target's database, not DATABASE_URL's: that is where dbt created these tables.
        return CompiledWindows.open(connect, plan_models(nodes), tenant_id, checks)

    def params(self, tenant_id: str | None, models: Sequence[str]) -> list[Any]:
        """The ``models``' dbt nodes compiled once, with the window as ``$1``/``$2``; raises NotCompilable.

        The next :meth:`windows` of the same models uses them instead of compiling again.
        """
        # dbt compile prints the SQL of selected nodes even with --quiet; it is for us, not the user.
        args = ["--vars", json.dumps(compiled_vars(tenant_id)), "--select", *models, "--no-write-json"]
        res = self.dbt.invoke("compile", *args, "--log-level", "none", manifest=copy_manifest(self.manifest.require()))
        if not res.success:
            raise NotCompilable(f"dbt could not compile the models once for all windows: {error_text(res, [])}")
        nodes = [r.node for r in res.result.results if r.node.resource_type == "model" and node_label(r.node) in models]
        self._params_compiled = ((tenant_id, tuple(models)), nodes)
        return nodes

    def tests(self, connect: dict[str, str], tenant_id: str | None, models: Sequence[str]) -> WindowTests:
        """The data tests attached to ``models``, compiled once, scoped to the window (``$1``/``$2``) and tenant.

        Raises RunnerError when dbt cannot compile them (see :mod:`dbtbackfill.runner.window_tests`).
        """
        manifest = copy_manifest(self.manifest.require())
        selected = {
            n.unique_id: n
            for n in manifest.nodes.values()
            if n.resource_type == "model" and node_label(n) in models and n.config.materialized != "ephemeral"
        }
        tests = attached_tests(manifest.nodes.values(), selected)
        if not tests:
            return WindowTests([], connect)
        for test in tests:  # dbt's own where config: {{ model }} in the test reads the window's rows
            test.config.where = scope(selected[test.attached_node], tenant_id, test.config.where)
        args = ["--vars", json.dumps(compiled_vars(tenant_id)), "--select", *sorted({t.name for t in tests})]
        args += ["--no-write-json", "--log-level", "none"]
        res = self.dbt.invoke("compile", *args, manifest=copy_manifest(manifest))
        if not res.success:
            raise RunnerError(f"dbt could not compile the data tests for --verify: {error_text(res, [])}")
        compiled = {r.node.unique_id: r.node for r in res.result.results if r.node.resource_type == "test"}
        found = [t for t in tests if t.unique_id in compiled]
        return WindowTests([window_test(compiled[t.unique_id], selected[t.attached_node]) for t in found], connect)
