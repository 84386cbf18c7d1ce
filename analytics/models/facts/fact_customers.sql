{{
    config(
        materialized='incremental',
        incremental_strategy='delete+insert',
        unique_key=['tenant_id', 'customer_id'],
        indexes=[
            {'columns': ['tenant_id', 'customer_id'], 'unique': true},
            {'columns': ['created_at']},
        ],
        pre_hook="{{ dbt_backfill.backfill_delete_window('created_at') }}",
    )
}}

-- One row per customer. Windowed on the customer's created_at (UTC days), so a customer
-- belongs to exactly one window. Nothing here may look at rows outside the window (such as
-- lifetime order totals): a window's rows must not depend on which other windows ran.

with customers as (

    select * from {{ ref('stg_customers') }}

),

final as (

    select
        tenant_id,
        customer_id,
        customer_name,
        email,
        split_part(email, '@', 2) as email_domain,
        (created_at at time zone 'UTC')::date as created_date,
        created_at

    from customers

)

select * from final
