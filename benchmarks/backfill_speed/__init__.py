"""How fast is a chunked backfill compared with one big ``dbt run`` and with a per-day shell loop?

``python -m benchmarks.backfill_speed [--days 365] [--tenants 3] [--rows-per-day 50] [--naive-sample N]``

On a throwaway local PostgreSQL (started and stopped here, also on Ctrl-C/SIGTERM) loaded with the
demo data, it measures, in one run so the numbers share the machine's conditions:

1. ``unchunked``: one ``dbt run`` over the whole range, as a fresh process, as a user would type it;
2. ``naive``: one ``dbt run`` process per day (a sample of days, extrapolated to all days);
3. ``cli``: ``python -m scripts.run_dbt_backfill --chunk day`` over the whole range, as a fresh process,
   with its default ``--engine auto`` (dbt compiles the models once, each window runs that SQL in one
   transaction); the benchmark fails unless (almost) every window really ran compiled;
   (3d) the same with ``--engine dbt`` (one in-process dbt invocation per window, the previous design),
   and, for comparison only, ``--chunk week`` and ``--chunk month``;

then, in this process, where the time goes: the compiled engine (the one compile, then SQL per window)
and the ``--engine dbt`` path (dbt set-up per invocation vs. SQL per model). Writes
``benchmarks/results/backfill_speed.json`` and a Markdown table next to it. See
``benchmarks/README.md`` for what each number means.

The package, by what each module holds:

- ``commands``: the measured command lines and how one process is run and timed;
- ``variants``: (1), (2) and (3), each as fresh processes, and the engine check;
- ``in_process``: where the time goes, in this process (with ``phase_timer``'s dbt phases);
- ``report``: the environment, the targets' verdicts and the Markdown (from the JSON alone);
- ``run``: the options, the order of the variants, the clean-up (``__main__`` calls it).
"""
