"""The ``backfill_executions`` audit log: model, migrations on first use, idempotent writes.

Every write is keyed by the execution id, so a retried Job, a restarted operator or a
replayed audit write updates the same row instead of adding a second one.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal

import sqlalchemy as sa
from sqlalchemy import orm
from sqlalchemy.dialects import postgresql as pg

from dbtbackfill.core import database_url
from dbtbackfill.core.cost import CellEstimate

Status = Literal["running", "completed", "failed", "cancelled"]
Kind = Literal["run", "backfill", "chunk"]
STATUSES: Final = ("running", "completed", "failed", "cancelled")
#: What history shows: the stored statuses, and ``abandoned`` (see ``effective_status``).
SHOWN_STATUSES: Final = (*STATUSES, "abandoned")
KINDS: Final = ("run", "backfill", "chunk")

# Our own Alembic version table: the audited database is usually an application
# database that may run Alembic itself under the default name.
VERSION_TABLE: Final = "dbt_backfill_alembic_version"
#: The newest migration in migrations/versions (a unit test keeps the two in step). A database
#: already there needs no Alembic at all, which saves every backfill process importing it.
HEAD_REVISION: Final = "0004"
# Serialises concurrent first-use migrations from parallel chunk Jobs.
_MIGRATION_LOCK_KEY: Final = 0x64627462  # "dbtb"
MAX_ERROR_CHARS: Final = 8000
#: A running execution beats at least this often (and after every window).
HEARTBEAT_SECONDS: Final = 15.0
#: A ``running`` row whose last beat is older than this is shown as ``abandoned``: its process
#: is gone (SIGKILL, a lost database, a deleted node) without closing it.
STALE_AFTER_SECONDS: Final = 120


class ExecutionConflict(ValueError):
    """An execution id already names a different execution (another range, tenant or models)."""


class Base(orm.DeclarativeBase):
    pass


class BackfillExecution(Base):
    """One execution: a CLI run, an operator backfill, or one attempt of one chunk."""

    __tablename__ = "backfill_executions"
    __table_args__ = (
        sa.CheckConstraint(f"status in {STATUSES!r}", name="ck_backfill_executions_status"),
        sa.CheckConstraint(f"kind in {KINDS!r}", name="ck_backfill_executions_kind"),
        sa.Index("ix_backfill_executions_created_at", "created_at"),
        sa.Index("ix_backfill_executions_status_created_at", "status", "created_at"),
        sa.Index("ix_backfill_executions_parent_id", "parent_id"),
    )

    id: orm.Mapped[uuid.UUID] = orm.mapped_column(pg.UUID(as_uuid=True), primary_key=True)
    parent_id: orm.Mapped[uuid.UUID | None] = orm.mapped_column(pg.UUID(as_uuid=True))
    kind: orm.Mapped[str] = orm.mapped_column(sa.Text, server_default="run")
    tenant_id: orm.Mapped[str | None] = orm.mapped_column(sa.Text)
    start_date: orm.Mapped[date] = orm.mapped_column(sa.Date)
    end_date: orm.Mapped[date] = orm.mapped_column(sa.Date)
    models: orm.Mapped[list[str]] = orm.mapped_column(pg.ARRAY(sa.Text), server_default="{}")
    status: orm.Mapped[str] = orm.mapped_column(sa.Text)
    duration_seconds: orm.Mapped[float | None] = orm.mapped_column(sa.Float)
    records_processed: orm.Mapped[int | None] = orm.mapped_column(sa.BigInteger)
    error_message: orm.Mapped[str | None] = orm.mapped_column(sa.Text)
    backfill_name: orm.Mapped[str | None] = orm.mapped_column(sa.Text)
    backfill_namespace: orm.Mapped[str | None] = orm.mapped_column(sa.Text)
    backfill_uid: orm.Mapped[str | None] = orm.mapped_column(sa.Text)
    chunk_index: orm.Mapped[int | None] = orm.mapped_column(sa.Integer)
    attempt: orm.Mapped[int | None] = orm.mapped_column(sa.Integer)
    #: The dbt target the data went to: profile, target, adapter, host, port, database, schema.
    target: orm.Mapped[dict[str, Any] | None] = orm.mapped_column(pg.JSONB)
    created_at: orm.Mapped[datetime] = orm.mapped_column(sa.DateTime(timezone=True), server_default=sa.func.now())
    updated_at: orm.Mapped[datetime] = orm.mapped_column(sa.DateTime(timezone=True), server_default=sa.func.now())
    finished_at: orm.Mapped[datetime | None] = orm.mapped_column(sa.DateTime(timezone=True))
    heartbeat_at: orm.Mapped[datetime | None] = orm.mapped_column(sa.DateTime(timezone=True))
    #: A dry run: nothing was written; kept out of the ETA's past durations.
    dry_run: orm.Mapped[bool] = orm.mapped_column(sa.Boolean, server_default=sa.false())
    #: A dry run's planner estimate of the source rows its windows read.
    estimated_source_rows: orm.Mapped[int | None] = orm.mapped_column(sa.BigInteger)
    #: ``status``, except that a ``running`` row whose heartbeat is stale reads ``abandoned``
    #: (rows written before heartbeats existed count from their last update).
    effective_status: orm.Mapped[str] = orm.column_property(
        sa.case(
            (
                sa.and_(
                    status == "running",
                    sa.func.coalesce(heartbeat_at, updated_at)
                    < sa.func.now() - sa.literal(timedelta(seconds=STALE_AFTER_SECONDS)),
                ),
                "abandoned",
            ),
            else_=status,
        )
    )


_TABLE: Final = sa.Table("backfill_executions", Base.metadata, extend_existing=True)


def sqlalchemy_url(url: str) -> str:
    """Point plain ``postgresql://`` URLs at the psycopg 3 driver we ship."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


_engines: dict[tuple[str, int, int, int], sa.Engine] = {}


def engine_for(url: str, connect_timeout: int = 10, *, pool_size: int = 5, max_overflow: int = 10) -> sa.Engine:
    """One pooled engine per (URL, timeout, pool limits) for the life of the process.

    ``pool_size`` connections are kept, up to ``max_overflow`` more are opened under load
    (SQLAlchemy's defaults; the operator sizes them to its threads).

    Every parameter of the URL reaches each connection (``connect_timeout`` in the URL wins over
    the argument); raises :class:`~dbtbackfill.core.database_url.DatabaseUrlError` for a URL libpq refuses.
    """
    key = (url, connect_timeout, pool_size, max_overflow)
    if key not in _engines:
        settings = database_url.parse(url)
        _engines[key] = sa.create_engine(
            sqlalchemy_url(url),
            pool_pre_ping=True,
            pool_size=pool_size,
            max_overflow=max_overflow,
            connect_args={
                **settings.libpq(),
                "connect_timeout": settings.given.get("connect_timeout", connect_timeout),
            },
        )
    return _engines[key]


def dispose_engines() -> None:
    """Close every pooled connection (end of a command, or of a test)."""
    for engine in _engines.values():
        engine.dispose()
    _engines.clear()


def _alembic_config(connection: sa.Connection) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.attributes["connection"] = connection
    return cfg


def upgrade(engine: sa.Engine, revision: str = "head") -> None:
    """Apply the audit migrations, once, even when many Jobs start together."""
    from alembic import command

    with engine.connect() as connection:
        connection.execute(sa.select(sa.func.pg_advisory_lock(_MIGRATION_LOCK_KEY)))
        try:
            command.upgrade(_alembic_config(connection), revision)
            connection.commit()
        except BaseException:
            # Leave the failed transaction first: the unlock below must run, or the session
            # lock stays held by the pooled connection and every later upgrade waits forever.
            connection.rollback()
            raise
        finally:
            connection.execute(sa.select(sa.func.pg_advisory_unlock(_MIGRATION_LOCK_KEY)))
            connection.commit()


def current_revision(engine: sa.Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        rev: str | None = context.get_current_revision()
        return rev


_upgraded: set[str] = set()


def _at_head(engine: sa.Engine) -> bool:
    with engine.connect() as connection:
        if connection.execute(sa.select(sa.func.to_regclass(VERSION_TABLE))).scalar() is None:
            return False
        versions = sa.table(VERSION_TABLE, sa.column("version_num"))
        found: list[object] = list(connection.execute(sa.select(versions.c.version_num)).scalars())
        return found == [HEAD_REVISION]


def ensure_schema(engine: sa.Engine) -> None:
    """Migrate on first use in this process; later calls cost nothing."""
    key = engine.url.render_as_string(hide_password=False)
    if key not in _upgraded:
        if not _at_head(engine):
            upgrade(engine)
        _upgraded.add(key)


@dataclass(frozen=True)
class ExecutionStart:
    id: uuid.UUID
    start_date: date
    end_date: date
    tenant_id: str | None = None
    models: Sequence[str] = ()
    kind: Kind = "run"
    parent_id: uuid.UUID | None = None
    backfill_name: str | None = None
    backfill_namespace: str | None = None
    backfill_uid: str | None = None
    chunk_index: int | None = None
    attempt: int | None = None
    target: Mapping[str, Any] | None = None
    dry_run: bool = False


#: What makes an execution the same one: a replay with another of these is another run.
_IDENTITY: Final = ("kind", "parent_id", "tenant_id", "start_date", "end_date", "models")


def record_start(engine: sa.Engine, start: ExecutionStart) -> None:
    """Write (or reset to) ``running``. Replaying it for the same id touches one row only.

    Raises :class:`ExecutionConflict`, writing nothing, when the id already belongs to an
    execution of another kind, parent, tenant, range or models.
    """
    values: dict[str, Any] = {
        "id": start.id,
        "parent_id": start.parent_id,
        "kind": start.kind,
        "tenant_id": start.tenant_id,
        "start_date": start.start_date,
        "end_date": start.end_date,
        "models": list(start.models),
        "status": "running",
        "backfill_name": start.backfill_name,
        "backfill_namespace": start.backfill_namespace,
        "backfill_uid": start.backfill_uid,
        "chunk_index": start.chunk_index,
        "attempt": start.attempt,
        "target": dict(start.target) if start.target is not None else None,
        "heartbeat_at": sa.func.now(),
        "dry_run": start.dry_run,
    }
    insert = pg.insert(_TABLE).values(**values)
    # A re-run of the same execution id (a restarted pod) starts over in the same row;
    # created_at keeps the first start so history stays ordered by when work began.
    upsert = insert.on_conflict_do_update(
        index_elements=[_TABLE.c.id],
        set_={
            "status": "running",
            "target": insert.excluded.target,
            "error_message": None,
            "duration_seconds": None,
            "records_processed": None,
            "dry_run": insert.excluded.dry_run,
            "estimated_source_rows": None,
            "finished_at": None,
            "updated_at": sa.func.now(),
            "heartbeat_at": sa.func.now(),
        },
        where=sa.and_(*(_TABLE.c[name].is_not_distinct_from(insert.excluded[name]) for name in _IDENTITY)),
    ).returning(_TABLE.c.id)
    with engine.begin() as conn:
        # No row back: the id exists and the WHERE refused the update (rowcount is not reliable here).
        if conn.execute(upsert).first() is not None:
            return
        existing = conn.execute(sa.select(*(_TABLE.c[name] for name in _IDENTITY)).where(_TABLE.c.id == start.id)).one()
    theirs = ", ".join(f"{name}={value}" for name, value in zip(_IDENTITY, existing, strict=True) if value is not None)
    raise ExecutionConflict(f"execution id {start.id} already belongs to another execution ({theirs})")


def beat(engine: sa.Engine, execution_id: uuid.UUID) -> None:
    """Mark a running execution as alive now."""
    update = (
        sa.update(_TABLE)
        .where(_TABLE.c.id == execution_id, _TABLE.c.status == "running")
        .values(heartbeat_at=sa.func.now())
    )
    with engine.begin() as conn:
        conn.execute(update)


def record_finish(
    engine: sa.Engine,
    execution_id: uuid.UUID,
    status: Status,
    *,
    duration_seconds: float | None,
    records_processed: int | None,
    error_message: str | None = None,
    estimated_source_rows: int | None = None,
) -> bool:
    """Close a row (a dry run's with its estimate). Returns False when no such row exists."""
    if status == "running":
        raise ValueError("a finished execution cannot have status 'running'")
    update = (
        sa.update(_TABLE)
        .where(_TABLE.c.id == execution_id)
        .values(
            status=status,
            duration_seconds=duration_seconds,
            records_processed=records_processed,
            error_message=error_message[:MAX_ERROR_CHARS] if error_message else None,
            estimated_source_rows=estimated_source_rows,
            updated_at=sa.func.now(),
            finished_at=sa.func.now(),
        )
    )
    with engine.begin() as conn:
        return conn.execute(update).rowcount == 1


def history(
    engine: sa.Engine,
    *,
    status: str | None = None,
    limit: int = 20,
    parent_id: uuid.UUID | None = None,
    backfill: tuple[str, str] | None = None,
) -> list[BackfillExecution]:
    """Newest first; ``status`` filters on the effective status (``running`` excludes abandoned rows).
    ``backfill``: (namespace, name) of a DbtBackfill, its own row and its chunks' rows."""
    if limit < 0:
        raise ValueError("limit must be >= 0")
    query = sa.select(BackfillExecution).order_by(BackfillExecution.created_at.desc()).limit(limit)
    if status:
        query = query.where(BackfillExecution.effective_status == status)
    if parent_id:
        query = query.where(BackfillExecution.parent_id == parent_id)
    if backfill:
        namespace, name = backfill
        query = query.where(BackfillExecution.backfill_namespace == namespace, BackfillExecution.backfill_name == name)
    with orm.Session(engine, expire_on_commit=False) as session:
        return list(session.scalars(query))


def get(engine: sa.Engine, execution_id: uuid.UUID) -> BackfillExecution | None:
    with orm.Session(engine, expire_on_commit=False) as session:
        return session.get(BackfillExecution, execution_id)


def chunk_durations(engine: sa.Engine, models: Sequence[str], limit: int = 500) -> tuple[int, int, float]:
    """(chunks, days, seconds) of the latest ``limit`` completed chunk runs of exactly ``models``:
    what an ETA of another backfill of the same models can go by."""
    row = BackfillExecution
    latest = (
        sa.select(
            (row.end_date - row.start_date + 1).label("days"),
            row.duration_seconds.label("seconds"),
        )
        .where(
            row.kind.in_(("chunk", "run")),
            row.status == "completed",
            row.dry_run.is_(False),
            row.duration_seconds.is_not(None),
            row.models == list(models),
        )
        .order_by(row.created_at.desc())
        .limit(limit)
        .subquery()
    )
    query = sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(latest.c.days), 0),
                      sa.func.coalesce(sa.func.sum(latest.c.seconds), 0.0))  # fmt: skip
    with engine.connect() as conn:
        chunks, days, seconds = conn.execute(query).one().tuple()
    return int(chunks), int(days or 0), float(seconds or 0.0)


def completed_records(engine: sa.Engine, parent_id: uuid.UUID) -> int:
    """The rows the completed chunks of one backfill (``parent_id``) processed, summed."""
    row = BackfillExecution
    total = sa.func.coalesce(sa.func.sum(row.records_processed), 0)
    query = sa.select(total).where(row.parent_id == parent_id, row.status == "completed")
    with engine.connect() as conn:
        records: Any = conn.execute(query).scalar_one()
    return int(records)


def dry_run_estimates(engine: sa.Engine, parent_id: uuid.UUID) -> tuple[int, int, CellEstimate | None]:
    """(cells, total rows, largest cell) over the completed dry-run chunks of the backfill
    ``parent_id``, each chunk counted once (its latest attempt). Aggregated in the database, so
    the answer stays three numbers and one row for any number of cells."""
    row = BackfillExecution
    latest = (
        sa.select(row.chunk_index, row.tenant_id, row.start_date, row.end_date, row.estimated_source_rows)
        .where(
            row.parent_id == parent_id,
            row.kind == "chunk",
            row.dry_run.is_(True),
            row.status == "completed",
            row.estimated_source_rows.is_not(None),
        )
        .distinct(row.chunk_index)
        .order_by(row.chunk_index, row.attempt.desc())
        .subquery()
    )
    totals = sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(latest.c.estimated_source_rows), 0))
    largest = sa.select(latest).order_by(latest.c.estimated_source_rows.desc(), latest.c.chunk_index).limit(1)
    with engine.connect() as conn:
        cells, total = conn.execute(totals).one().tuple()
        top = conn.execute(largest).first()
    cell = None if top is None else CellEstimate(top[0], top[1], top[2], top[3], int(top[4]))
    return int(cells), int(total), cell
