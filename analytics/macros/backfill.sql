{#-
  The seed's spelling, kept working: backfill_date_range(var('backfill_start_date'),
  var('backfill_end_date'), var('tenant_id'), ...) and backfill_delete_window(...) without the
  package prefix forward to the dbt_backfill package (dbt-package/), which holds the logic.
  New models call dbt_backfill.backfill_date_range(...) directly.
-#}

{% macro backfill_date_range(start_date, end_date, tenant_id, date_column='created_at', tenant_column='tenant_id') -%}
    {{ return(dbt_backfill.backfill_date_range(start_date, end_date, tenant_id,
                                               date_column=date_column, tenant_column=tenant_column)) }}
{%- endmacro %}


{% macro backfill_delete_window(date_column, tenant_column='tenant_id') -%}
    {{ return(dbt_backfill.backfill_delete_window(date_column, tenant_column=tenant_column)) }}
{%- endmacro %}
