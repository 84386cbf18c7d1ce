-- Revenue share per store and product type (run by hand: dbt compile --select store_mix).
select store_id, product_type, sum(line_total) as revenue
from {{ ref('order_items') }}
group by 1, 2
