{{
    config(
        unique_key=['store_id', 'customer_id'],
        pre_hook="{{ dbt_backfill.backfill_delete_window('created_at', tenant_column='store_id') }}",
    )
}}

select store_id, customer_id, customer_name, created_at
from {{ ref('stg_customers') }}
