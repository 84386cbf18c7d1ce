"""Chunked, audited, tenant-safe dbt backfills on PostgreSQL: a command-line runner and a
Kubernetes operator that share one core.

The subpackages follow the data flow, and imports only ever point down this list
(``tests/unit/test_layout.py`` checks it):

- entry points: :mod:`dbtbackfill.cli` (``dbt-backfill`` and ``python -m scripts.run_dbt_backfill``)
  and :mod:`dbtbackfill.kubectl` (``kubectl-dbf``, the kubectl plugin);
- :mod:`dbtbackfill.demo`: a local PostgreSQL and the demo data (uses runner and core);
- :mod:`dbtbackfill.runner`: one backfill in one process, the dbt session that runs its windows;
- :mod:`dbtbackfill.operator`: the kopf operator that turns a DbtBackfill into chunk Jobs;
- :mod:`dbtbackfill.core`: what both halves share (planning, the spec, the audit log, cost).

``runner`` and ``operator`` never import each other: a chunk Job runs the runner's command, and
the two meet only in the core (the spec, the plan and the audit log).
"""

__version__ = "0.1.0"
