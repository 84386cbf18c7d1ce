-- One row per order of the window (on ordered_at) and tenant. Ephemeral (see dbt_project.yml).
with source as (

    select * from {{ source('raw', 'orders') }}
    where 1=1
      {{ dbt_backfill.backfill_date_range(date_column='ordered_at') }}

),

renamed as (

    select
        tenant_id,
        order_id,
        customer_id,
        status,
        amount,
        ordered_at

    from source

)

select * from renamed
