{{
    config(
        unique_key=['date_day'],
        pre_hook="{{ dbt_backfill.backfill_delete_window('date_day', tenant_column=none) }}",
    )
}}

-- MetricFlow's calendar. It has no store: tenant_column=none, so a store's backfill rebuilds the
-- window's days for everyone (the same rows).
select date_day
from (
    select day::date as date_day
    from generate_series(date '2023-01-01', date '2026-12-31', interval '1 day') as day
) as days
where 1=1
  {{ dbt_backfill.backfill_date_range(date_column='date_day', tenant_column=none) }}
