{{
    config(
        unique_key=['store_id', 'customer_id'],
        pre_hook="{{ dbt_backfill.backfill_delete_window('created_at', tenant_column='store_id') }}",
    )
}}

-- v2 adds the e-mail domain; v1 stays for the dashboards that still read it.
select
    store_id,
    customer_id,
    customer_name,
    split_part(email, '@', 2) as email_domain,
    created_at

from {{ ref('stg_customers') }}
