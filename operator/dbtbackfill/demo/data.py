"""Deterministic demo data for the ``analytics`` dbt project: ``raw.customers`` and ``raw.orders``.

The rows of one (tenant, day) come from a random generator seeded with
``(seed, tenant, day)`` only, so loading a range always writes the same rows for a day
whichever range is asked for, and loading the same range twice changes nothing.

Shape of the data, per tenant (``tenant-001``, ``tenant-002``, ...) and per UTC day:

* ``customers_per_day(rows_per_day)`` new customers, created at times spread through the day;
* ``rows_per_day`` orders, at times spread through the day, each by a customer created
  at or before the order: a customer of the same day, or of one of the
  :data:`CUSTOMER_LOOKBACK_DAYS` days before (so some orders of a window belong to customers
  created before it). The customers of those earlier days are loaded too.

Ids are readable and stable: ``YYYYMMDD * 100000 + n`` (n starting at 1) for both orders and
customers, unique per tenant.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, Final

import psycopg
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

__all__ = [
    "CUSTOMER_LOOKBACK_DAYS",
    "MAX_ROWS_PER_DAY",
    "DemoCounts",
    "customers_per_day",
    "load_demo_data",
    "sqlalchemy_url",
    "tenant_ids",
]

#: Orders of a day may belong to customers created up to this many days earlier.
CUSTOMER_LOOKBACK_DAYS: Final = 7
#: Ids are ``YYYYMMDD * 100000 + n``: n must stay below 100000.
MAX_ROWS_PER_DAY: Final = 99_999
_ID_DAY_FACTOR: Final = 100_000
_SECONDS_PER_DAY: Final = 86_400

_STATUSES: Final = ("placed", "shipped", "completed", "returned")
_STATUS_WEIGHTS: Final = (15, 25, 50, 10)
# fmt: off
_FIRST_NAMES: Final = (
    "Ada", "Alan", "Barbara", "Claude", "Dennis", "Donald", "Edsger", "Frances", "Grace", "Guido",
    "John", "Ken", "Leslie", "Linus", "Margaret", "Niklaus", "Radia", "Shafi", "Tim", "Tony",
)
_LAST_NAMES: Final = (
    "Allen", "Backus", "Cerf", "Dijkstra", "Hamilton", "Hoare", "Hopper", "Kay", "Knuth", "Lamport",
    "Liskov", "Lovelace", "McCarthy", "Perlman", "Ritchie", "Shannon", "Thompson", "Turing",
    "Wirth", "Wing",
)
# fmt: on

_DDL: Final = (
    "create schema if not exists raw",
    """
    create table if not exists raw.customers (
        tenant_id text not null,
        customer_id bigint not null,
        name text not null,
        email text not null,
        created_at timestamptz not null,
        primary key (tenant_id, customer_id)
    )
    """,
    """
    create table if not exists raw.orders (
        tenant_id text not null,
        order_id bigint not null,
        customer_id bigint not null,
        status text not null check (status in ('placed', 'shipped', 'completed', 'returned')),
        amount numeric(12, 2) not null,
        ordered_at timestamptz not null,
        primary key (tenant_id, order_id)
    )
    """,
    # Every backfill window reads the sources by time: without these, each window scans the table.
    "create index if not exists customers_created_at_idx on raw.customers (created_at)",
    "create index if not exists orders_ordered_at_idx on raw.orders (ordered_at)",
)

_CustomerRow = tuple[str, int, str, str, datetime]
_OrderRow = tuple[str, int, int, str, Decimal, datetime]


@dataclass(frozen=True)
class DemoCounts:
    """Rows written by one :func:`load_demo_data` call.

    ``customers`` includes the customers of the lookback days before ``start_date`` whose
    orders may fall inside the range.
    """

    customers: int
    orders: int


def sqlalchemy_url(url: str) -> str:
    """Return ``url`` with the psycopg 3 driver: ``postgresql://`` becomes ``postgresql+psycopg://``.

    ``postgres://`` (Heroku style) is accepted too; a URL naming another driver or database
    is a :class:`ValueError`.
    """
    parsed = make_url(url)
    backend, _, driver = parsed.drivername.partition("+")
    if backend not in ("postgresql", "postgres") or driver not in ("", "psycopg"):
        raise ValueError(f"expected a postgresql:// URL (psycopg 3 driver), got {parsed.drivername}://")
    return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def tenant_ids(tenants: int) -> list[str]:
    """The ids of the first ``tenants`` demo tenants: ``tenant-001``, ``tenant-002``, ..."""
    return [f"tenant-{n:03d}" for n in range(1, tenants + 1)]


def customers_per_day(rows_per_day: int) -> int:
    """New customers per tenant per day for ``rows_per_day`` orders a day (about one in four)."""
    return max(1, (rows_per_day + 3) // 4)


def load_demo_data(
    database_url: str,
    *,
    tenants: int,
    start_date: date,
    days: int,
    rows_per_day: int = 20,
    seed: int = 42,
) -> DemoCounts:
    """Create ``raw.customers`` and ``raw.orders`` if needed and load ``days`` days of demo rows.

    For each tenant, the days ``start_date`` .. ``start_date + days - 1`` (UTC) are replaced in
    one transaction: the orders and customers of those days are deleted, then the generated
    rows are written (customers of the lookback days before ``start_date`` are upserted, so
    orders outside the range keep their customers). Same arguments, same rows.
    """
    _validate(tenants=tenants, start_date=start_date, days=days, rows_per_day=rows_per_day)
    tenant_list = tenant_ids(tenants)
    end_date = start_date + timedelta(days=days - 1)
    lookback_start = max(date.min, start_date - timedelta(days=CUSTOMER_LOOKBACK_DAYS))

    customers: list[_CustomerRow] = []
    orders: list[_OrderRow] = []
    for tenant in tenant_list:
        by_day = {day: _customers_of_day(seed, tenant, day, rows_per_day) for day in _days(lookback_start, end_date)}
        for day_customers in by_day.values():
            customers.extend(day_customers)
        for day in _days(start_date, end_date):
            orders.extend(_orders_of_day(seed, tenant, day, rows_per_day, by_day))

    range_start = _midnight(start_date)
    range_end = _midnight(end_date) + timedelta(days=1)
    engine = create_engine(sqlalchemy_url(database_url))
    try:
        with engine.begin() as connection:
            raw = connection.connection.driver_connection
            if not isinstance(raw, psycopg.Connection):  # pragma: no cover - guarded by sqlalchemy_url
                raise TypeError("load_demo_data needs the psycopg 3 driver")
            with raw.cursor() as cursor:
                for statement in _DDL:
                    cursor.execute(statement)
                _replace_range(cursor, tenant_list, range_start, range_end, customers, orders)
    finally:
        engine.dispose()
    return DemoCounts(customers=len(customers), orders=len(orders))


def _validate(*, tenants: int, start_date: date, days: int, rows_per_day: int) -> None:
    if isinstance(start_date, datetime) or not isinstance(start_date, date):
        raise ValueError(f"start_date must be a date, got {start_date!r}")
    for name, value in (("tenants", tenants), ("days", days), ("rows_per_day", rows_per_day)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if tenants > 999:
        raise ValueError(f"tenants must be at most 999, got {tenants}")
    if rows_per_day > MAX_ROWS_PER_DAY:
        raise ValueError(f"rows_per_day must be at most {MAX_ROWS_PER_DAY}, got {rows_per_day}")
    if days > (date.max - start_date).days:
        raise ValueError(f"days={days} from {start_date.isoformat()} runs past the year 9999")


def _days(first: date, last: date) -> Iterator[date]:
    day = first
    while day <= last:
        yield day
        day += timedelta(days=1)


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=UTC)


def _rng(seed: int, tenant: str, day: date, stream: str) -> random.Random:
    # A str seed is hashed with SHA-512: stable across processes, unlike hash().
    return random.Random(f"{seed}:{tenant}:{day.isoformat()}:{stream}")  # noqa: S311 - demo data


def _day_id(day: date, n: int) -> int:
    return (day.year * 10_000 + day.month * 100 + day.day) * _ID_DAY_FACTOR + n


def _spread(rng: random.Random, day: date, count: int) -> list[datetime]:
    """``count`` increasing instants through ``day``: one in each equal slice of the day."""
    midnight = _midnight(day)
    out = []
    for i in range(count):
        low = i * _SECONDS_PER_DAY // count
        high = (i + 1) * _SECONDS_PER_DAY // count
        offset = rng.randrange(low, max(high, low + 1))
        out.append(midnight + timedelta(seconds=offset))
    return out


def _customers_of_day(seed: int, tenant: str, day: date, rows_per_day: int) -> list[_CustomerRow]:
    rng = _rng(seed, tenant, day, "customers")
    rows: list[_CustomerRow] = []
    for n, created_at in enumerate(_spread(rng, day, customers_per_day(rows_per_day)), start=1):
        customer_id = _day_id(day, n)
        first, last = rng.choice(_FIRST_NAMES), rng.choice(_LAST_NAMES)
        email = f"{first}.{last}.{customer_id}@example.com".lower()
        rows.append((tenant, customer_id, f"{first} {last}", email, created_at))
    return rows


def _orders_of_day(
    seed: int, tenant: str, day: date, rows_per_day: int, customers_by_day: Mapping[date, list[_CustomerRow]]
) -> list[_OrderRow]:
    """The orders of one tenant and day; ``customers_by_day`` must hold the lookback days.

    Those customers are themselves a function of (seed, tenant, day), so the orders of a day
    depend on nothing else either.
    """
    earlier = [
        row[1]
        for back in range(CUSTOMER_LOOKBACK_DAYS, 0, -1)
        for row in customers_by_day.get(day - timedelta(days=back), [])
    ]
    same_day = customers_by_day[day]
    rng = _rng(seed, tenant, day, "orders")
    rows: list[_OrderRow] = []
    for n, ordered_at in enumerate(_spread(rng, day, rows_per_day), start=1):
        candidates = earlier + [row[1] for row in same_day if row[4] <= ordered_at]
        if candidates:
            customer_id = rng.choice(candidates)
        else:
            # Only on the first days of the calendar: no earlier customer exists, so the
            # order takes the day's first customer, and never predates its creation.
            customer_id, ordered_at = same_day[0][1], max(ordered_at, same_day[0][4])
        status = rng.choices(_STATUSES, weights=_STATUS_WEIGHTS)[0]
        amount = Decimal(rng.randint(500, 25_000)).scaleb(-2)
        rows.append((tenant, _day_id(day, n), customer_id, status, amount, ordered_at))
    return rows


def _replace_range(
    cursor: psycopg.Cursor[Any],
    tenants: Sequence[str],
    range_start: datetime,
    range_end: datetime,
    customers: Sequence[_CustomerRow],
    orders: Sequence[_OrderRow],
) -> None:
    """Delete the range's rows, then COPY the new rows in through temporary tables."""
    cursor.execute(
        "delete from raw.orders where tenant_id = any(%s) and ordered_at >= %s and ordered_at < %s",
        (list(tenants), range_start, range_end),
    )
    cursor.execute(
        "delete from raw.customers where tenant_id = any(%s) and created_at >= %s and created_at < %s",
        (list(tenants), range_start, range_end),
    )
    cursor.execute("create temporary table demo_customers (like raw.customers including defaults) on commit drop")
    cursor.execute("create temporary table demo_orders (like raw.orders including defaults) on commit drop")
    with cursor.copy("copy demo_customers (tenant_id, customer_id, name, email, created_at) from stdin") as copy:
        for customer in customers:
            copy.write_row(customer)
    with cursor.copy(
        "copy demo_orders (tenant_id, order_id, customer_id, status, amount, ordered_at) from stdin"
    ) as copy:
        for order in orders:
            copy.write_row(order)
    cursor.execute(
        """
        insert into raw.customers (tenant_id, customer_id, name, email, created_at)
        select tenant_id, customer_id, name, email, created_at from demo_customers
        on conflict (tenant_id, customer_id) do update
            set name = excluded.name, email = excluded.email, created_at = excluded.created_at
        """
    )
    cursor.execute(
        """
        insert into raw.orders (tenant_id, order_id, customer_id, status, amount, ordered_at)
        select tenant_id, order_id, customer_id, status, amount, ordered_at from demo_orders
        on conflict (tenant_id, order_id) do update
            set customer_id = excluded.customer_id, status = excluded.status,
                amount = excluded.amount, ordered_at = excluded.ordered_at
        """
    )
