with source as (

    select * from {{ source('jaffle', 'customers') }}
    where 1=1
      {{ dbt_backfill.backfill_date_range(date_column='created_at', tenant_column='store_id') }}

)

select
    store_id,
    customer_id,
    name as customer_name,
    lower(email) as email,
    created_at

from source
