-- dbt microbatch: one batch per UTC day of orders (dbt filters ref('orders') by its event_time).
{{
    config(
        materialized='incremental',
        incremental_strategy='microbatch',
        event_time='order_date',
        batch_size='day',
        begin='2024-01-01',
        unique_key=['store_id', 'order_date'],
    )
}}

select
    store_id,
    order_date,
    count(*) as order_count,
    sum(order_total)::numeric(16, 2) as revenue,
    coalesce(sum(order_total) filter (where is_returned), 0)::numeric(16, 2) as returned_revenue

from {{ ref('orders') }}
group by 1, 2
