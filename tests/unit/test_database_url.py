"""Parsing the database URL once, with libpq's own parser, for every connection of a run."""

from __future__ import annotations

import pytest

from dbtbackfill.core.database_url import DatabaseUrlError, parse


def test_every_query_parameter_is_kept_and_the_url_wins_over_our_defaults() -> None:
    settings = parse(
        "postgresql://u:p%40ss@db.example:6432/app?sslmode=verify-full&sslrootcert=/ca.pem&application_name=x"
    )
    assert settings.libpq() == {
        "host": "db.example",
        "port": "6432",
        "user": "u",
        "password": "p@ss",
        "dbname": "app",
        "sslmode": "verify-full",
        "sslrootcert": "/ca.pem",
        "application_name": "x",
        "connect_timeout": "10",
    }
    assert parse("postgresql://u@h/db").libpq()["application_name"] == "dbt-backfill"


def test_dbt_gets_profile_fields_and_libpq_variables_for_the_rest() -> None:
    settings = parse(
        "postgres://u:pw@h/db?application_name=x&connect_timeout=3&keepalives_idle=30"
        "&sslmode=require&sslcert=/c&sslkey=/k&options=-c%20search_path%3Dx&target_session_attrs=read-write"
    )
    assert settings.dbt_env("analytics") == {
        "DBT_PG_HOST": "h",
        "DBT_PG_PORT": "5432",
        "DBT_PG_USER": "u",
        "DBT_PG_PASSWORD": "pw",
        "DBT_PG_DBNAME": "db",
        "DBT_PG_SCHEMA": "analytics",
        "DBT_PG_APPLICATION_NAME": "x",
        "DBT_PG_CONNECT_TIMEOUT": "3",
        "DBT_PG_KEEPALIVES_IDLE": "30",
    }
    assert settings.libpq_env() == {
        "PGSSLMODE": "require",
        "PGSSLCERT": "/c",
        "PGSSLKEY": "/k",
        "PGOPTIONS": "-c search_path=x",
        "PGTARGETSESSIONATTRS": "read-write",
    }


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://root:secret@h/db", "must be a postgresql:// URL, got mysql://"),
        ("not a url", "is not a URL"),
        ("postgresql://u:secret@h/db?foo=1", 'invalid URI query parameter: "foo"'),
        ("postgresql://u:secret@h/db?keepalives=1", "parameter keepalives cannot reach dbt's connections"),
        ("postgresql://u:secret@/db", "must name a host and a database"),
        ("postgresql://u:secret@h", "must name a host and a database"),
        ("postgresql://u:sec%zzret@h/db", "database URL is not valid"),
    ],
)
def test_an_unusable_url_is_one_line_without_the_password(url: str, message: str) -> None:
    with pytest.raises(DatabaseUrlError, match=message) as info:
        parse(url)
    text = str(info.value)
    assert "\n" not in text and "secret" not in text and "sec%zz" not in text
