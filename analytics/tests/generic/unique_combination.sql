{#- Fails for every combination of `columns` that occurs more than once (compound keys). -#}
{% test unique_combination(model, columns) %}
{%- set cols = [] -%}
{%- for column in columns -%}
    {%- do cols.append(adapter.quote(column)) -%}
{%- endfor %}
select {{ cols | join(', ') }}, count(*) as n_records
from {{ model }}
group by {{ cols | join(', ') }}
having count(*) > 1
{% endtest %}
