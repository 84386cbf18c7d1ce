-- order_items has no date: a window's items are those of the window's orders.
with items as (

    select
        i.store_id,
        i.order_id,
        i.item_id,
        i.sku,
        i.quantity,
        o.ordered_at

    from {{ source('jaffle', 'order_items') }} as i
    join {{ source('jaffle', 'orders') }} as o
      on o.store_id = i.store_id and o.order_id = i.order_id
    where 1=1
      {{ dbt_backfill.backfill_date_range(date_column='o.ordered_at', tenant_column='i.store_id') }}

)

select * from items
