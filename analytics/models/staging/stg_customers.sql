-- One row per customer of the window (on created_at) and tenant. Ephemeral (see dbt_project.yml).
with source as (

    select * from {{ source('raw', 'customers') }}
    where 1=1
      {{ dbt_backfill.backfill_date_range(date_column='created_at') }}

),

renamed as (

    select
        tenant_id,
        customer_id,
        name as customer_name,
        lower(email) as email,
        created_at

    from source

)

select * from renamed
