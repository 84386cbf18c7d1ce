"""``python -m scripts.run_dbt_backfill``: the documented backfill command.

Thin on purpose: the logic lives in ``dbtbackfill.cli`` so the console script
``dbt-backfill run`` and the operator's Jobs run exactly the same code.
"""

from dbtbackfill.cli import main_run_dbt_backfill

if __name__ == "__main__":
    main_run_dbt_backfill()
