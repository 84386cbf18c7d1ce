"""The parse key: which Jinja reads make a parse depend on credentials (dbtbackfill.runner.parse_key)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from dbtbackfill.runner.parse_key import PLACEHOLDERS, connection_reads, parse_environment, project_connection_reads

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "text",
    [
        "select * from {{ ref('stg_orders') }}",
        "{{ config(schema=target.schema, database=target.database) }}",
        "{% if target.name == 'prod' %}{{ target['type'] }}{% endif %}",
        "{{ target.get('threads') }} {{ target.dbname }} {{ target . profile_name }}",
        "the target user is plain text outside Jinja: target.user",
        "{{ env_var('DBT_PG_SCHEMA', 'analytics') }} {{ env_var('TENANT_LIST') }}",
        "{{ my_target.user }} {{ retarget.host }}",
    ],
)
def test_relation_settings_and_plain_text_are_not_connection_reads(text: str) -> None:
    assert connection_reads(text) == set()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{{ config(grants={'select': [target.user]}) }}", {"target.user"}),
        ("{% set h = target['host'] %}", {"target.host"}),
        ("{{ target.get('port') }}", {"target.port"}),
        ("{{ target }}", {"target"}),
        ("{{ target | tojson }}", {"target"}),
        ("{%- if env_var('DBT_PG_HOST') == 'x' -%}{%- endif -%}", {"env_var('DBT_PG_HOST')"}),
        ("{{\n  target\n  .role\n}}", {"target.role"}),
        ("{{ target.schema }} {{ target.pass }}", {"target.pass"}),
    ],
)
def test_connection_reads_are_found_inside_jinja(text: str, expected: set[str]) -> None:
    assert connection_reads(text) == expected


def test_placeholders_apply_only_when_no_file_reads_them() -> None:
    real = {"DBT_PG_HOST": "db.internal", "DBT_PG_PORT": "6432", "DBT_PG_USER": "u", "DBT_PG_PASSWORD": "p"}
    assert parse_environment(real, {}) == dict(PLACEHOLDERS)
    reads = project_connection_reads([("models/a.sql", "{{ target.user }}"), ("models/b.sql", "select 1")])
    assert reads == {"models/a.sql": {"target.user"}}
    assert parse_environment(real, reads) == {}
    # Nothing is invented for a variable the environment does not set.
    assert parse_environment({"DBT_PG_HOST": "h"}, {}) == {"DBT_PG_HOST": "localhost"}


def test_the_shipped_project_reads_no_credentials() -> None:
    project = REPO / "analytics"
    sources = [
        (p.relative_to(project).as_posix(), p.read_text())
        for p in project.rglob("*")
        if p.suffix in {".sql", ".yml", ".yaml", ".md"} and p.name != "profiles.yml" and "target" not in p.parts
    ]
    assert sources
    assert project_connection_reads(sources) == {}


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "deploy/examples/own-project/Dockerfile"])
def test_the_image_parses_with_the_placeholders(dockerfile: str) -> None:
    # The build-time parse and a Pod's parse must hash the same connection values (the operator's
    # image, and the recipe for an image of one's own project).
    parser = DockerfileParser(fileobj=io.BytesIO((REPO / dockerfile).read_bytes()))
    (line,) = [i["value"] for i in parser.structure if i["instruction"] == "RUN" and "dbt parse" in i["value"]]
    for key, value in PLACEHOLDERS.items():
        if value:
            assert f"{key}={value} " in line, key
        else:
            assert f"{key}=" not in line, f"{key} is unset at build time and empty in PLACEHOLDERS"
