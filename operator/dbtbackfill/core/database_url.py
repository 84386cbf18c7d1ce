"""One database URL, every connection: dbt's, the compiled engine's and the audit log's.

The URL is parsed by libpq itself (psycopg's ``conninfo_to_dict``), so a query parameter
libpq does not know is refused here, in one line, before anything connects, and every one it
knows (``sslmode``, ``sslrootcert``, ``application_name``, ``options``, ``connect_timeout``...)
reaches each connection the runner opens:

- psycopg connections (the compiled engine, the audit log) get them as keyword arguments;
- dbt-postgres connects with what its profile says: ``profiles.yml`` reads the ``DBT_PG_*``
  variables of :meth:`ConnectionSettings.dbt_env` for the fields dbt passes itself, and libpq
  reads every other parameter from its own environment variable (``PGSSLMODE``,
  ``PGOPTIONS``...), set by :meth:`ConnectionSettings.libpq_env` while dbt runs.

A parameter with neither a profile field nor a libpq environment variable (``keepalives``,
``tcp_user_timeout``...) could not reach dbt's connections, so it is refused rather than
applied to some connections only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Final

#: What every connection of ours says unless the URL says otherwise.
DEFAULTS: Final = {"application_name": "dbt-backfill", "connect_timeout": "10"}
#: The libpq parameters dbt-postgres takes from its profile, and the variables profiles.yml reads them from.
PROFILE_VARIABLES: Final = {
    "host": "DBT_PG_HOST",
    "port": "DBT_PG_PORT",
    "user": "DBT_PG_USER",
    "password": "DBT_PG_PASSWORD",
    "dbname": "DBT_PG_DBNAME",
    "application_name": "DBT_PG_APPLICATION_NAME",
    "connect_timeout": "DBT_PG_CONNECT_TIMEOUT",
    "keepalives_idle": "DBT_PG_KEEPALIVES_IDLE",
}
_SCHEME_RE: Final = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")
_SCHEMES: Final = ("postgresql", "postgres", "postgresql+psycopg", "postgresql+psycopg2")
_SHAPE: Final = "expected postgresql://user:password@host:port/database?parameter=value"


class DatabaseUrlError(ValueError):
    """A database URL we cannot use; the message is one line and never contains the password."""


@cache
def _libpq_environment_variables() -> Mapping[str, str]:
    from psycopg import pq

    return {
        o.keyword.decode(): o.envvar.decode()
        for o in pq.Conninfo.get_defaults()
        if o.envvar  # e.g. keepalives, sslpassword: libpq reads them from no variable
    }


@dataclass(frozen=True)
class ConnectionSettings:
    """The libpq keywords a URL gives: host, port, user, password, dbname and every query parameter."""

    given: Mapping[str, str]

    def libpq(self) -> dict[str, str]:
        """psycopg keyword arguments: our defaults, then everything the URL says."""
        return {**DEFAULTS, **self.given}

    def dbt_env(self, schema: str) -> dict[str, str]:
        """The ``DBT_PG_*`` variables ``profiles.yml`` reads."""
        params = self.libpq()
        return {
            "DBT_PG_HOST": params["host"],
            "DBT_PG_PORT": params.get("port") or "5432",
            "DBT_PG_USER": params.get("user") or "postgres",
            "DBT_PG_PASSWORD": params.get("password", ""),
            "DBT_PG_DBNAME": params["dbname"],
            "DBT_PG_SCHEMA": schema,
            "DBT_PG_APPLICATION_NAME": params["application_name"],
            "DBT_PG_CONNECT_TIMEOUT": params["connect_timeout"],
            "DBT_PG_KEEPALIVES_IDLE": params.get("keepalives_idle", "0"),  # 0: dbt passes none
        }

    def beyond_profile(self) -> dict[str, str]:
        """The URL's parameters that dbt's profile does not carry (``sslmode``, ``options``...)."""
        return {k: v for k, v in self.given.items() if k not in PROFILE_VARIABLES}

    def libpq_env(self) -> dict[str, str]:
        """libpq's own variables for :meth:`beyond_profile`: how they reach dbt's connections."""
        variables = _libpq_environment_variables()
        return {variables[k]: v for k, v in self.beyond_profile().items()}


def parse(url: str) -> ConnectionSettings:
    """The URL's connection settings, or :class:`DatabaseUrlError` saying what is wrong."""
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    match = _SCHEME_RE.match(url)
    if match is None:
        raise DatabaseUrlError(f"database URL is not a URL ({_SHAPE})")
    scheme = match["scheme"].lower()
    if scheme not in _SCHEMES:
        raise DatabaseUrlError(f"database URL must be a postgresql:// URL, got {scheme}://")
    try:
        given = conninfo_to_dict("postgresql://" + url[match.end() :])
    except ProgrammingError as exc:
        # libpq names a bad query parameter; other messages may quote the URL, password and all.
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        detail = text if "query parameter" in text else _SHAPE
        raise DatabaseUrlError(f"database URL is not valid: {detail}") from None
    if not given.get("host") or not given.get("dbname"):
        raise DatabaseUrlError("database URL must name a host and a database: postgresql://user@host:5432/db")
    settings = ConnectionSettings({k: str(v) for k, v in given.items() if v is not None})
    unreachable = sorted(
        k for k in settings.given if k not in PROFILE_VARIABLES and k not in _libpq_environment_variables()
    )
    if unreachable:
        raise DatabaseUrlError(
            f"database URL parameter {', '.join(unreachable)} cannot reach dbt's connections "
            "(dbt-postgres' profile has no such field and libpq reads no environment variable for it)"
        )
    return settings
