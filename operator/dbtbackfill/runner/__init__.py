"""The runner half: one backfill of one date range in one process (the CLI and every chunk Job).

- :mod:`~dbtbackfill.runner.session`: :class:`~dbtbackfill.runner.session.DbtSession` (one dbt
  project, parsed once) and :func:`~dbtbackfill.runner.session.run_windows`; the session's parts
  live in :mod:`~dbtbackfill.runner.manifest`, :mod:`~dbtbackfill.runner.invocation`,
  :mod:`~dbtbackfill.runner.results` and :mod:`~dbtbackfill.runner.compile_once`;
- :mod:`~dbtbackfill.runner.compiled`: the compiled engine (each model compiled once, every window
  runs from that SQL); :mod:`~dbtbackfill.runner.contract_check`: which models it may run;
- :mod:`~dbtbackfill.runner.project`: which dbt project, profile and target;
  :mod:`~dbtbackfill.runner.parse_key`: when a parse can be reused;
- :mod:`~dbtbackfill.runner.progress`, :mod:`~dbtbackfill.runner.phase_timings`,
  :mod:`~dbtbackfill.runner.window_tests`, :mod:`~dbtbackfill.runner.lifecycle` (SIGTERM and the
  heartbeat), :mod:`~dbtbackfill.runner.cost_estimate` (the planner's row estimates).

May import :mod:`dbtbackfill.core`; never :mod:`dbtbackfill.operator`, the demo or the entry points.
"""
