"""The operator half: kopf handlers that turn a DbtBackfill (or a DbtBackfillQueue) into Jobs.

The flow: :mod:`~dbtbackfill.operator.handlers` (thin kopf handlers) ->
:mod:`~dbtbackfill.operator.controller` (reads the CR and its Jobs, one API call, patches status)
-> :mod:`~dbtbackfill.operator.reconcile` (pure: what to do next) ->
:mod:`~dbtbackfill.operator.jobs` (pure: the chunk Job manifests) ->
:mod:`~dbtbackfill.operator.status` (pure: conditions, counts, ETA). Queues:
``queue_admission`` (pure), ``queue_status`` (pure), ``queue_gate`` and ``queue_handlers``.
Around them: ``kube`` (API client and constants), ``policy``, ``pod_start``, ``worker_pools``,
``metrics`` and ``main`` (``dbt-backfill operator``).

May import :mod:`dbtbackfill.core`; never :mod:`dbtbackfill.runner`, the demo or the entry points
(a chunk Job runs the runner as its own process, ``python -m scripts.run_dbt_backfill``).
Absolute imports throughout, so this subpackage never shadows the standard library's ``operator``.
"""
