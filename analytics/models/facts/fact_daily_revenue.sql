{{
    config(
        materialized='incremental',
        incremental_strategy='delete+insert',
        unique_key=['tenant_id', 'order_date'],
        indexes=[
            {'columns': ['tenant_id', 'order_date'], 'unique': true},
            {'columns': ['order_date']},
        ],
        pre_hook="{{ dbt_backfill.backfill_delete_window('order_date') }}",
    )
}}

-- One row per tenant per UTC day that has orders. Built from fact_orders, read through the
-- same window (order_date is the UTC day of ordered_at, the column fact_orders is windowed on).

with orders as (

    select * from {{ ref('fact_orders') }}
    where 1=1
      {{ dbt_backfill.backfill_date_range(date_column='order_date') }}

),

daily as (

    select
        tenant_id,
        order_date,
        count(*) as order_count,
        count(distinct customer_id) as customer_count,
        count(*) filter (where is_returned) as returned_order_count,
        sum(amount) as gross_revenue,
        coalesce(sum(amount) filter (where is_returned), 0) as returned_amount,
        sum(net_amount) as net_revenue

    from orders
    group by tenant_id, order_date

),

final as (

    select
        tenant_id,
        order_date,
        order_count,
        customer_count,
        returned_order_count,
        gross_revenue::numeric(14, 2) as gross_revenue,
        returned_amount::numeric(14, 2) as returned_amount,
        net_revenue::numeric(14, 2) as net_revenue,
        round(gross_revenue / order_count, 2)::numeric(14, 2) as average_order_value

    from daily

)

select * from final
