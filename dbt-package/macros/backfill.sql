{#-
  Window and tenant filters for backfillable models. Every input is validated here, at
  compile time, because vars come from the command line and end up inside SQL.
  Documented in macros/backfill.yml.

  Installed as a package, these macros run in the calling model's context, where only the
  root project's macros are in scope without a prefix: so every call between them names the
  package (dbt_backfill.backfill__column(...)), and they resolve wherever the package is installed.
-#}

{% macro backfill_date_range(start_date=var('backfill_start_date', none), end_date=var('backfill_end_date', none),
                             tenant_id=var('tenant_id', none), date_column='created_at', tenant_column='tenant_id') -%}
    {%- if start_date == dbt_backfill.backfill__param_start() and end_date == dbt_backfill.backfill__param_end() -%}
        {#- The runner compiles a model once for many windows: the window becomes the
            statement parameters $1 (first day) and $2 (last day), typed date. -#}
        {%- set lower = "$1::date" -%}
        {%- set upper = "$2::date" -%}
    {%- else -%}
        {%- set start = dbt_backfill.backfill__date_arg('backfill_start_date', start_date) -%}
        {%- set end = dbt_backfill.backfill__date_arg('backfill_end_date', end_date) -%}
        {%- if (start is none) != (end is none) -%}
            {{ exceptions.raise_compiler_error(
                "both backfill_start_date and backfill_end_date are required for a date filter"
                ~ " (got backfill_start_date=" ~ ('null' if start_date is none else start_date | string)
                ~ ", backfill_end_date=" ~ ('null' if end_date is none else end_date | string) ~ ")") }}
        {%- endif -%}
        {%- if start is not none and start > end -%}
            {{ exceptions.raise_compiler_error(
                "backfill_start_date " ~ start ~ " is after backfill_end_date " ~ end) }}
        {%- endif -%}
        {%- set lower = none if start is none else "'" ~ start ~ "'::date" -%}
        {%- set upper = none if end is none else "'" ~ end ~ "'::date" -%}
    {%- endif -%}
    {%- set tenant = dbt_backfill.backfill__tenant_arg(tenant_id) -%}
    {%- set clauses = [] -%}
    {%- if lower is not none -%}
        {%- set col = dbt_backfill.backfill__column(date_column, 'date_column') -%}
        {%- do clauses.append(col ~ " >= " ~ lower ~ " and " ~ col ~ " < " ~ upper ~ " + 1") -%}
    {%- endif -%}
    {%- if tenant is not none and tenant_column is not none -%}
        {%- do clauses.append(dbt_backfill.backfill__column(tenant_column, 'tenant_column') ~ " = '" ~ tenant ~ "'") -%}
    {%- endif -%}
    {%- if clauses and flags.FULL_REFRESH -%}
        {#- A full refresh recreates the table from this run's rows: with a window or a tenant
            it would silently drop everything outside them. -#}
        {{ exceptions.raise_compiler_error(
            "--full-refresh rebuilds whole tables; it cannot be combined with backfill_start_date,"
            ~ " backfill_end_date or tenant_id (run it without them)") }}
    {%- endif -%}
    {%- if clauses -%}
        {{ return("and " ~ clauses | join(" and ")) }}
    {%- else -%}
        {{ return("") }}
    {%- endif -%}
{%- endmacro %}


{% macro backfill_delete_window(date_column, tenant_column='tenant_id') -%}
    {#- For a pre_hook: on an incremental run of a window or a tenant, delete exactly what the run
        rebuilds. Without a window and a tenant it renders nothing, so a plain incremental run is
        dbt's own (delete+insert on the unique_key of whatever the model selects). -#}
    {%- if is_incremental() and dbt_backfill.is_backfill() -%}
        delete from {{ this }}
        where 1=1
          {{ dbt_backfill.backfill_date_range(var('backfill_start_date', none), var('backfill_end_date', none),
                                              var('tenant_id', none), date_column=date_column,
                                              tenant_column=tenant_column) }}
    {%- endif -%}
{%- endmacro %}


{% macro is_backfill() -%}
    {#- True when this run has a backfill window or a tenant: models with their own incremental
        filter (`where updated_at > (select max(updated_at) from this)`) skip it then. -#}
    {%- set given = [] -%}
    {%- for name in ['backfill_start_date', 'backfill_end_date', 'tenant_id'] -%}
        {%- if not dbt_backfill.backfill__is_blank(var(name, none)) -%}
            {%- do given.append(name) -%}
        {%- endif -%}
    {%- endfor -%}
    {{ return(given | length > 0) }}
{%- endmacro %}


{#- The window-parameter placeholders the runner passes as backfill_start_date/backfill_end_date
    when it compiles models once for many windows (dbtbackfill/compiled.py uses the same text).
    They are not dates, so any other use of the vars fails validation or shows in the SQL. -#}
{% macro backfill__param_start() -%}{{ return('__backfill_window_start__') }}{%- endmacro %}
{% macro backfill__param_end() -%}{{ return('__backfill_window_end__') }}{%- endmacro %}


{% macro backfill__is_blank(value) -%}
    {{ return(value is none or (value is string and value == '')) }}
{%- endmacro %}


{% macro backfill__date_arg(name, value) -%}
    {#- Returns a validated 'YYYY-MM-DD' string, or none when the value is null or blank. -#}
    {%- if dbt_backfill.backfill__is_blank(value) -%}
        {{ return(none) }}
    {%- endif -%}
    {#- YAML on the command line turns an unquoted 2024-01-31 into a date object. -#}
    {%- set text = value.isoformat() if value is not string and value.isoformat is defined else value | string -%}
    {%- if not modules.re.fullmatch('[0-9]{4}-[0-9]{2}-[0-9]{2}', text) -%}
        {{ exceptions.raise_compiler_error(
            name ~ " must be a date formatted YYYY-MM-DD, got " ~ '"' ~ text ~ '"') }}
    {%- endif -%}
    {%- set year = text[0:4] | int -%}
    {%- set month = text[5:7] | int -%}
    {%- set day = text[8:10] | int -%}
    {%- set leap = (year % 4 == 0 and year % 100 != 0) or year % 400 == 0 -%}
    {%- set month_days = [31, 29 if leap else 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31] -%}
    {%- if year < 1 or month < 1 or month > 12 or day < 1 or day > month_days[month - 1] -%}
        {{ exceptions.raise_compiler_error(name ~ " is not a real date: " ~ '"' ~ text ~ '"') }}
    {%- endif -%}
    {{ return(text) }}
{%- endmacro %}


{% macro backfill__tenant_arg(value) -%}
    {%- if dbt_backfill.backfill__is_blank(value) -%}
        {{ return(none) }}
    {%- endif -%}
    {%- set text = value | string -%}
    {%- if not modules.re.fullmatch('[A-Za-z0-9][A-Za-z0-9_-]{0,62}', text) -%}
        {{ exceptions.raise_compiler_error(
            "tenant_id must match ^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$, got " ~ '"' ~ text ~ '"') }}
    {%- endif -%}
    {{ return(text) }}
{%- endmacro %}


{% macro backfill__column(name, argument) -%}
    {#- A column name, optionally qualified ("o.ordered_at"); each part is validated and quoted. -#}
    {%- if name is not string or not modules.re.fullmatch('[A-Za-z_][A-Za-z0-9_]*([.][A-Za-z_][A-Za-z0-9_]*)?', name) -%}
        {{ exceptions.raise_compiler_error(
            "backfill_date_range: " ~ argument ~ " must be a column name like created_at or o.created_at, got "
            ~ '"' ~ (name | string) ~ '"') }}
    {%- endif -%}
    {%- set parts = [] -%}
    {%- for part in name.split('.') -%}
        {%- do parts.append(adapter.quote(part)) -%}
    {%- endfor -%}
    {{ return(parts | join('.')) }}
{%- endmacro %}
