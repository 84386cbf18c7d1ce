{#-
  Compound foreign key: every non-null combination of `columns` in the model must exist as
  `to_columns` in `to`. Point it at a source, not at a windowed fact: a windowed fact only
  holds the rows of the windows loaded so far. `{{ model }}` is read in a CTE of its own: with a
  `where` config (dbt's, or --verify's window) it renders as an aliased subquery.
-#}
{% test relationships_combination(model, columns, to, to_columns) %}
{%- set child = [] -%}
{%- set parent = [] -%}
{%- set joins = [] -%}
{%- set not_nulls = [] -%}
{%- for column in columns -%}
    {%- do child.append('child.' ~ adapter.quote(column)) -%}
    {%- do not_nulls.append('child.' ~ adapter.quote(column) ~ ' is not null') -%}
    {%- do joins.append('child.' ~ adapter.quote(column) ~ ' = parent.' ~ adapter.quote(to_columns[loop.index0])) -%}
{%- endfor %}
with child as (
    select * from {{ model }}
)
select {{ child | join(', ') }}
from child
where {{ not_nulls | join(' and ') }}
  and not exists (
    select 1 from {{ to }} as parent
    where {{ joins | join(' and ') }}
  )
{% endtest %}
