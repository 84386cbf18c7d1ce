"""Alembic environment: always runs on a connection handed in by ``dbtbackfill.core.audit.upgrade``."""

from __future__ import annotations

from alembic import context

from dbtbackfill.core.audit import VERSION_TABLE, Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `dbt-backfill db upgrade`, which supplies the connection")

context.configure(connection=connection, target_metadata=Base.metadata, version_table=VERSION_TABLE)
with context.begin_transaction():
    context.run_migrations()
