with source as (

    select * from {{ source('jaffle', 'orders') }}
    where 1=1
      {{ dbt_backfill.backfill_date_range(date_column='ordered_at', tenant_column='store_id') }}

)

select
    store_id,
    order_id,
    customer_id,
    status,
    ordered_at,
    (ordered_at at time zone 'UTC')::date as order_date

from source
