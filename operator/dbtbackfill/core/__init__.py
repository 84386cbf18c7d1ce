"""What the runner and the operator share: the plan, the spec, the audit log and cost.

- :mod:`~dbtbackfill.core.planner`: dates -> windows (chunks), and range compression;
- :mod:`~dbtbackfill.core.spec`: a DbtBackfill spec, parsed and re-validated;
- :mod:`~dbtbackfill.core.audit`: the ``backfill_executions`` table and its Alembic migrations
  (``migrations/``, found next to ``audit.py``, so they ship as package data);
- :mod:`~dbtbackfill.core.cost`: source rows and ETA before launch (pure);
- :mod:`~dbtbackfill.core.database_url`: one parser for every database URL.

May import only the standard library, third-party packages and other ``core`` modules: nothing
in here knows about dbt sessions, kopf or the command line.
"""
