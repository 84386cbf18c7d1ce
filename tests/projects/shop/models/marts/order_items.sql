{{
    config(
        unique_key=['store_id', 'order_id', 'item_id'],
        pre_hook="{{ dbt_backfill.backfill_delete_window('ordered_at', tenant_column='store_id') }}",
        indexes=[{'columns': ['store_id', 'order_id', 'item_id'], 'unique': true}, {'columns': ['ordered_at']}],
    )
}}

select
    items.store_id,
    items.order_id,
    items.item_id,
    items.sku,
    products.product_name,
    products.product_type,
    items.quantity,
    {{ shop_utils.cents_to_dollars('products.price_cents') }} as unit_price,
    {{ shop_utils.cents_to_dollars('products.price_cents * items.quantity') }} as line_total,
    items.ordered_at

from {{ ref('stg_order_items') }} as items
left join {{ ref('stg_products') }} as products using (sku)
