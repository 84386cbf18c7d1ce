"""The project's parsed manifest: the parse (reusing a saved one when dbt allows), the copy each
dbt invocation may mutate, and what its nodes say about the selected models.

A process parses into its own private target dir, next to the shared one that parallel
backfills (and the image) save ``partial_parse.msgpack`` in.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from dbtbackfill.runner.compiled import Hook, ModelNode
from dbtbackfill.runner.invocation import DbtInvocation, RunnerError, environ_overrides, reset_adapter_behavior_flags
from dbtbackfill.runner.parse_key import parse_environment, project_connection_reads
from dbtbackfill.runner.results import node_label

# Files whose Jinja a parse renders (packages included); target/ and logs/ are dbt's output.
_PARSED_SUFFIXES: Final = frozenset({".sql", ".yml", ".yaml", ".md"})
_NOT_PARSED_DIRS: Final = frozenset({"target", "logs"})


def _project_sources(project_dir: Path) -> Iterator[tuple[str, str]]:
    for path in sorted(project_dir.rglob("*")):
        relative = path.relative_to(project_dir)
        if relative.parts[0] in _NOT_PARSED_DIRS or path.suffix not in _PARSED_SUFFIXES or not path.is_file():
            continue
        if relative.as_posix() == "profiles.yml":  # where the credentials come in, not project Jinja
            continue
        yield relative.as_posix(), path.read_text(errors="replace")


def copy_manifest(manifest: Any) -> Any:
    """A copy of a parsed manifest that one dbt invocation may mutate.

    dbt compiles into the nodes it is given (ephemeral CTEs injected and flagged as done), so
    each invocation needs its own nodes. Only those are copied: ``Manifest.deepcopy()`` also
    round-trips every other part through ``to_dict``/``from_dict``, which fails on real projects
    (disabled nodes are lists: ``'list' object has no attribute 'from_dict'``; saved queries'
    ``query_params`` do not survive the round trip) and costs most of its time on macros dbt
    never changes. Everything but the nodes and unit tests is shared, read-only, with the parse.
    """
    from dbt.contracts.graph.manifest import Manifest

    def node_copy(node: Any) -> Any:
        try:
            return node.from_dict(node.to_dict(omit_none=True))
        except Exception:  # a node type whose round trip is lossy: copy it as an object
            import copy

            return copy.deepcopy(node)

    copied: Any = Manifest(
        nodes={k: node_copy(v) for k, v in manifest.nodes.items()},
        sources=manifest.sources,
        macros=manifest.macros,
        docs=manifest.docs,
        exposures=manifest.exposures,
        functions=manifest.functions,
        metrics=manifest.metrics,
        groups=manifest.groups,
        selectors=manifest.selectors,
        metadata=manifest.metadata,
        disabled=manifest.disabled,
        files=manifest.files,
        state_check=manifest.state_check,
        semantic_models=manifest.semantic_models,
        unit_tests={k: node_copy(v) for k, v in manifest.unit_tests.items()},
        saved_queries=manifest.saved_queries,
    )
    copied.build_flat_graph()
    return copied


def model_node(node: Any, nodes: Any) -> ModelNode:
    """The parts of a compiled dbt model node :mod:`dbtbackfill.runner.compiled` plans with.

    ``depends_on`` looks through ephemeral models (dbt inlines them) to the models they read.
    """
    reads: set[str] = set()
    pending = list(node.depends_on.nodes)
    while pending:
        uid = pending.pop()
        dep = nodes.get(uid)
        if dep is not None and dep.resource_type == "model" and dep.config.materialized == "ephemeral":
            pending.extend(dep.depends_on.nodes)
        else:
            reads.add(uid)
    config = node.config
    key = config.unique_key
    return ModelNode(
        unique_id=node.unique_id,
        name=node_label(node),
        materialized=str(config.materialized),
        compiled_code=node.compiled_code or "",
        relation_name=node.relation_name,
        schema=node.schema,
        table=node.alias,
        incremental_strategy=config.incremental_strategy,
        unique_key=(key,) if isinstance(key, str) else tuple(key or ()),
        pre_hooks=tuple(Hook(h.sql, h.transaction) for h in config.pre_hook),
        post_hooks=tuple(Hook(h.sql, h.transaction) for h in config.post_hook),
        incremental_predicates=tuple(config.get("incremental_predicates") or ()),
        grants=bool(config.grants),
        persist_docs=bool(config.persist_docs),
        depends_on=tuple(sorted(reads)),
    )


@dataclass
class ProjectManifest:
    """One project's parse, kept for every later invocation, and where it is saved between runs."""

    #: The target dir parallel processes share (``partial_parse.msgpack``).
    base_target: Path
    #: This process's private target dir inside it.
    target_path: Path
    parsed: Any = None
    #: How the last parse went, for the user: "reused the saved parse" or why it could not.
    report: str = ""

    @classmethod
    def private_to_process(cls, target_path: Path | None, project_dir: Path) -> ProjectManifest:
        """A new private target dir in ``target_path`` (else ``$DBT_TARGET_PATH``, else the project's)."""
        base_target = Path(target_path or os.environ.get("DBT_TARGET_PATH") or project_dir / "target")
        # A private target dir per process: concurrent backfills (parallel chunks on one
        # node, two users on one checkout) would otherwise overwrite each other's manifest.
        base_target.mkdir(parents=True, exist_ok=True)
        return cls(base_target, Path(tempfile.mkdtemp(prefix=".run-", dir=base_target)))

    def seed(self, project_directory: Path) -> None:
        """Start from the last parse saved in the shared target dir (or the image's)."""
        for candidate in (self.base_target, project_directory / "target"):
            saved = candidate / "partial_parse.msgpack"
            if saved.exists():
                shutil.copy2(saved, self.target_path / "partial_parse.msgpack")
                return

    def _save(self) -> None:
        fresh = self.target_path / "partial_parse.msgpack"
        if fresh.exists():
            staged = self.base_target / f".partial_parse.{os.getpid()}"
            shutil.copy2(fresh, staged)
            staged.replace(self.base_target / "partial_parse.msgpack")  # atomic for readers

    def parse(self, dbt: DbtInvocation) -> None:
        """Parse the project, reusing the saved parse (the image's, or the last run's) when dbt allows.

        The parse sees placeholder host/port/user/password (:mod:`dbtbackfill.runner.parse_key`), so a
        parse saved for other credentials but the same database and schema is reused; the
        real credentials are back in the environment before anything connects.
        """
        from dbt.cli.main import dbtRunner

        reset_adapter_behavior_flags()  # snapshots the list before dbt's first adapter
        reads = project_connection_reads(_project_sources(dbt.project_dir))
        reasons: list[str] = []

        def on_event(event: Any) -> None:
            if event.info.name == "UnableToPartialParse":
                reasons.append(str(event.data.reason))

        started = time.monotonic()
        with dbt.environment(), environ_overrides(parse_environment(os.environ, reads)):
            res = dbtRunner(callbacks=[on_event]).invoke([*dbt.global_args(), "parse", *dbt.common_args()])
        if not res.success or res.result is None:
            raise RunnerError(f"dbt could not parse the project: {res.exception or 'see dbt logs'}")
        seconds = time.monotonic() - started
        if reasons:
            self.report = f"full parse in {seconds:.2f}s: dbt could not reuse the saved one ({reasons[-1]})"
        else:
            self.report = f"reused the saved parse ({seconds:.2f}s)"
        if reads:
            first = sorted(reads)[0]
            self.report += f"; keyed on the credentials because {first} reads {', '.join(sorted(reads[first]))}"
        self.parsed = res.result
        self._save()

    def require(self) -> Any:
        if self.parsed is None:
            raise RunnerError("call parse() first")
        return self.parsed

    def _models(self) -> list[Any]:
        nodes = self.parsed.nodes.values() if self.parsed is not None else ()
        return [n for n in nodes if n.resource_type == "model"]

    def microbatch_models(self, models: Sequence[str]) -> list[str]:
        """Those of ``models`` dbt runs as microbatch (``incremental_strategy='microbatch'``)."""
        return sorted(
            {
                node_label(n)
                for n in self._models()
                if node_label(n) in models and n.config.incremental_strategy == "microbatch"
            }
        )

    def reader_of(self, models: Sequence[str], sources: Sequence[str]) -> tuple[str, str] | None:
        """``(model, source)``: one of ``models`` that reads one of ``sources``, directly or not."""
        if self.parsed is None or not sources:
            return None
        nodes = self.parsed.nodes
        ids = {uid: node_label(n) for uid, n in nodes.items() if n.resource_type == "model"}
        for uid, name in ids.items():
            if name not in models:
                continue
            seen: set[str] = set()
            pending = list(nodes[uid].depends_on.nodes)
            while pending:
                dep = pending.pop()
                if dep in seen or dep not in ids:
                    continue
                seen.add(dep)
                if ids[dep] in sources:
                    return name, ids[dep]
                pending.extend(nodes[dep].depends_on.nodes)
        return None

    def relations(self) -> list[tuple[str, str]]:
        """The ``(schema, table)`` of every model dbt creates as a table."""
        return [(n.schema, n.alias) for n in self._models() if n.config.materialized not in ("ephemeral", "view")]
