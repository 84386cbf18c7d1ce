{{
    config(
        materialized='incremental',
        incremental_strategy='delete+insert',
        unique_key=['tenant_id', 'order_id'],
        indexes=[
            {'columns': ['tenant_id', 'order_id'], 'unique': true},
            {'columns': ['ordered_at']},
            {'columns': ['order_date']},
        ],
        pre_hook="{{ dbt_backfill.backfill_delete_window('ordered_at') }}",
    )
}}

-- One row per order. Windowed on ordered_at (UTC days). Indexed for per-window work: the window
-- delete uses ordered_at, fact_daily_revenue reads a window by order_date, and delete+insert
-- matches on the unique key (the unique index also holds the grain).

with orders as (

    select * from {{ ref('stg_orders') }}

),

final as (

    select
        tenant_id,
        order_id,
        customer_id,
        (ordered_at at time zone 'UTC')::date as order_date,
        ordered_at,
        status,
        amount,
        status = 'returned' as is_returned,
        case when status = 'returned' then 0 else amount end::numeric(12, 2) as net_amount

    from orders

)

select * from final
