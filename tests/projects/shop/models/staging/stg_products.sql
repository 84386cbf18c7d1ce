-- The menu is small and has neither a store nor a date: read whole in every window.
select
    sku,
    name as product_name,
    type as product_type,
    price_cents

from {{ source('jaffle', 'products') }}
