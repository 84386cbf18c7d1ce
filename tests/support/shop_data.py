"""Deterministic raw data for tests/projects/shop (the jaffle-shop shaped project).

Generated in SQL with ``generate_series``, so a year of three stores loads in about a second:
the benchmark uses the same loader as the tests.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

import psycopg

from tests.conftest import REPO_ROOT

PROJECT_DIR: Path = REPO_ROOT / "tests" / "projects" / "shop"
STORES = ("brooklyn", "chicago", "philly")
PRODUCTS = (
    ("JAF-001", "nutellaphone who dis?", "jaffle", 1100),
    ("JAF-002", "doctor stew", "jaffle", 1100),
    ("JAF-003", "the krautback", "jaffle", 1200),
    ("BEV-001", "tangaroo", "beverage", 600),
    ("BEV-002", "chai and mighty", "beverage", 500),
    ("BEV-003", "for richer or pourover", "beverage", 700),
)

_SCHEMA = """
drop schema if exists raw cascade;
create schema raw;
create table raw.products (sku text primary key, name text not null, type text not null, price_cents int not null);
create table raw.customers (
    store_id text not null, customer_id int not null, name text not null, email text not null,
    created_at timestamptz not null, primary key (store_id, customer_id)
);
create table raw.orders (
    store_id text not null, order_id int not null, customer_id int not null, status text not null,
    ordered_at timestamptz not null, primary key (store_id, order_id)
);
create table raw.order_items (
    store_id text not null, order_id int not null, item_id int not null, sku text not null, quantity int not null,
    primary key (store_id, order_id, item_id)
);
create index on raw.orders (ordered_at);
create index on raw.customers (created_at);
"""

# Per store and day: ``per_day`` orders spread over the day, 1-3 items each, and per_day // 5 + 1
# new customers; every value a function of (store, day, n), so two loads are identical.
_ROWS = """
insert into raw.customers
select s.store_id, d * (%(per_day)s / 5 + 1) + n + 1, 'customer ' || (d * 100 + n),
       'c' || (d * 100 + n) || '@' || (array['example.com', 'mail.test', 'shop.test'])[1 + (d + n) %% 3],
       %(start)s::timestamptz + make_interval(days => d, secs => 3600 + n * 600)
from unnest(%(stores)s::text[]) as s(store_id), generate_series(0, %(days)s - 1) as d,
     generate_series(0, %(per_day)s / 5) as n;

insert into raw.orders
select s.store_id, d * %(per_day)s + n + 1,
       ((d * %(per_day)s + n) * 7919) %% ((d + 1) * (%(per_day)s / 5 + 1)) + 1,
       case when (d * %(per_day)s + n) %% 17 = 0 then 'returned' else 'completed' end,
       %(start)s::timestamptz + make_interval(days => d, secs => (n * 86399) / %(per_day)s)
from unnest(%(stores)s::text[]) as s(store_id), generate_series(0, %(days)s - 1) as d,
     generate_series(0, %(per_day)s - 1) as n;

insert into raw.order_items
select o.store_id, o.order_id, i, (array['JAF-001', 'JAF-002', 'JAF-003', 'BEV-001', 'BEV-002', 'BEV-003'])
       [1 + (o.order_id + i) %% 6], 1 + (o.order_id * i) %% 2
from raw.orders as o, generate_series(1, 1 + o.order_id %% 3) as i;
"""


def load_shop_data(url: str, *, start: date, days: int, per_day: int = 10) -> int:
    """Replace ``raw`` with ``days`` days of orders for every store from ``start``; returns the order count."""
    with psycopg.connect(url) as conn:
        conn.execute(_SCHEMA)
        with conn.cursor() as cur:
            cur.executemany("insert into raw.products values (%s, %s, %s, %s)", PRODUCTS)
        params = {"start": start, "days": days, "per_day": per_day, "stores": list(STORES)}
        for statement in _ROWS.split(";"):
            if statement.strip():
                conn.execute(statement, params)
        conn.execute("analyze")
        row = conn.execute("select count(*) from raw.orders").fetchone()
    return int(row[0]) if row else 0


def shop_env(url: str, schema: str = "jaffle") -> dict[str, str]:
    """The shop profile's own variables (SHOP_PG_*), for a database URL."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    return {
        "SHOP_PG_HOST": parsed.host or "127.0.0.1",
        "SHOP_PG_PORT": str(parsed.port or 5432),
        "SHOP_PG_USER": parsed.username or "postgres",
        "SHOP_PG_PASSWORD": parsed.password or "",
        "SHOP_PG_DATABASE": parsed.database or "",
        "SHOP_SCHEMA": schema,
    }
