"""The demo-data loader against a real PostgreSQL: deterministic, idempotent, range-independent."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

from dbtbackfill.demo.data import (
    CUSTOMER_LOOKBACK_DAYS,
    DemoCounts,
    customers_per_day,
    load_demo_data,
    sqlalchemy_url,
)

START = date(2024, 2, 26)  # spans a leap day and a month end


def checksum(url: str, table: str) -> str:
    with psycopg.connect(url) as conn:
        query = sql.SQL("select md5(string_agg(t::text, '|' order by t::text)) from raw.{} t")
        row = conn.execute(query.format(sql.Identifier(table))).fetchone()
    assert row is not None
    return str(row[0])


def fetch(url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


@pytest.mark.integration
def test_counts_shape_and_integrity(database_url: str) -> None:
    counts = load_demo_data(database_url, tenants=2, start_date=START, days=5, rows_per_day=7)

    per_day = customers_per_day(7)
    assert counts == DemoCounts(customers=2 * (5 + CUSTOMER_LOOKBACK_DAYS) * per_day, orders=2 * 5 * 7)
    assert fetch(database_url, "select count(*) from raw.orders") == [(counts.orders,)]
    assert fetch(database_url, "select count(*) from raw.customers") == [(counts.customers,)]
    assert fetch(database_url, "select distinct tenant_id from raw.orders order by 1") == [
        ("tenant-001",),
        ("tenant-002",),
    ]
    # rows_per_day orders on every day, for every tenant, spread through the day
    per_tenant_day = fetch(
        database_url,
        "select tenant_id, (ordered_at at time zone 'UTC')::date, count(*),"
        " min(ordered_at at time zone 'UTC')::time, max(ordered_at at time zone 'UTC')::time"
        " from raw.orders group by 1, 2 order by 1, 2",
    )
    assert len(per_tenant_day) == 2 * 5
    assert {row[1] for row in per_tenant_day} == {START + timedelta(days=d) for d in range(5)}
    assert all(row[2] == 7 for row in per_tenant_day)
    assert all(row[3].hour < 6 and row[4].hour >= 18 for row in per_tenant_day)
    # every order has its tenant's customer, created at or before the order
    assert fetch(
        database_url,
        "select count(*) from raw.orders o left join raw.customers c"
        " on c.tenant_id = o.tenant_id and c.customer_id = o.customer_id"
        " where c.customer_id is null or c.created_at > o.ordered_at",
    ) == [(0,)]
    # some orders of the range belong to customers created before it (the backfill trap)
    [(before,)] = fetch(
        database_url,
        "select count(*) from raw.orders o join raw.customers c using (tenant_id, customer_id) where c.created_at < %s",
        datetime(START.year, START.month, START.day, tzinfo=UTC),
    )
    assert before > 0
    assert fetch(
        database_url,
        "select count(*) from raw.orders"
        " where status not in ('placed', 'shipped', 'completed', 'returned') or amount <= 0",
    ) == [(0,)]


@pytest.mark.integration
def test_same_arguments_same_rows(database_url: str) -> None:
    kwargs: dict[str, Any] = {"tenants": 3, "start_date": START, "days": 4, "rows_per_day": 5, "seed": 7}
    first = load_demo_data(database_url, **kwargs)
    sums = (checksum(database_url, "orders"), checksum(database_url, "customers"))

    # a deleted and an edited row come back, nothing is duplicated
    with psycopg.connect(database_url) as conn:
        conn.execute("delete from raw.orders where order_id = (select min(order_id) from raw.orders)")
        conn.execute("update raw.customers set name = 'changed'")
    assert load_demo_data(database_url, **kwargs) == first
    assert (checksum(database_url, "orders"), checksum(database_url, "customers")) == sums


@pytest.mark.integration
def test_deterministic_across_databases_and_independent_of_range(database_url: str, pg_server: Any) -> None:
    load_demo_data(database_url, tenants=2, start_date=START, days=6, rows_per_day=4)
    whole = checksum(database_url, "orders")
    customers = checksum(database_url, "customers")

    # the same days loaded in two overlapping pieces, newest first, in another database
    other = database_url.rsplit("/", 1)[0] + "/" + database_url.rsplit("/", 1)[1] + "_b"
    with psycopg.connect(pg_server.url, autocommit=True) as conn:
        conn.execute(f'create database "{other.rsplit("/", 1)[1]}" template template0')
    load_demo_data(other, tenants=2, start_date=START + timedelta(days=2), days=4, rows_per_day=4)
    load_demo_data(other, tenants=2, start_date=START, days=3, rows_per_day=4)
    assert checksum(other, "orders") == whole
    assert checksum(other, "customers") == customers


@pytest.mark.integration
def test_seed_changes_the_data(database_url: str) -> None:
    load_demo_data(database_url, tenants=1, start_date=START, days=2, rows_per_day=5, seed=1)
    one = checksum(database_url, "orders")
    load_demo_data(database_url, tenants=1, start_date=START, days=2, rows_per_day=5, seed=2)
    assert checksum(database_url, "orders") != one
    assert fetch(database_url, "select count(*) from raw.orders") == [(10,)]


@pytest.mark.integration
def test_loads_a_year_quickly(database_url: str) -> None:
    started = datetime.now(UTC)
    counts = load_demo_data(database_url, tenants=3, start_date=date(2023, 1, 1), days=365, rows_per_day=50)
    elapsed = (datetime.now(UTC) - started).total_seconds()
    assert counts.orders == 3 * 365 * 50
    assert elapsed < 10, f"loading a year took {elapsed:.1f}s"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tenants": 0}, "tenants must be an integer >= 1, got 0"),
        ({"days": 0}, "days must be an integer >= 1, got 0"),
        ({"rows_per_day": -1}, "rows_per_day must be an integer >= 1, got -1"),
        ({"rows_per_day": 100_000}, "rows_per_day must be at most 99999"),
        ({"tenants": 1000}, "tenants must be at most 999"),
        ({"start_date": datetime(2024, 1, 1, tzinfo=UTC)}, "start_date must be a date"),
        ({"start_date": date(9999, 12, 30), "days": 3}, "runs past the year 9999"),
    ],
)
def test_bad_arguments_are_value_errors(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"tenants": 1, "start_date": START, "days": 1, "rows_per_day": 1} | kwargs
    # validated before connecting: the URL points nowhere
    with pytest.raises(ValueError, match=message) as info:
        load_demo_data("postgresql://nobody@127.0.0.1:1/none", **args)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:p@h:5/db", "postgresql+psycopg://u:p@h:5/db"),
        ("postgres://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql+psycopg://u@h/db?sslmode=require", "postgresql+psycopg://u@h/db?sslmode=require"),
    ],
)
def test_sqlalchemy_url(url: str, expected: str) -> None:
    assert sqlalchemy_url(url) == expected


@pytest.mark.parametrize("url", ["mysql://u@h/db", "postgresql+psycopg2://u@h/db"])
def test_sqlalchemy_url_rejects_other_drivers(url: str) -> None:
    with pytest.raises(ValueError, match="expected a postgresql:// URL"):
        sqlalchemy_url(url)
