"""The ``backfill_executions`` audit log on a real PostgreSQL: migrations, model, idempotent writes."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from psycopg import sql

from dbtbackfill.core import audit
from tests.integration.conftest import audit_rows, execute, query, register_url, table_exists

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _dispose(dispose_engines: None) -> None:
    """audit.engine_for caches one engine per URL: close them after every test."""


@pytest.fixture
def engine(database_url: str) -> sa.Engine:
    """The CLI's engine for a fresh, empty database (no audit table yet)."""
    return audit.engine_for(register_url(database_url))


@pytest.fixture
def migrated(engine: sa.Engine) -> sa.Engine:
    audit.upgrade(engine)
    return engine


def head_revision() -> str:
    config = Config()
    config.set_main_option("script_location", str(Path(audit.__file__).parent / "migrations"))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


def version_rows(url: str) -> list[tuple[object, ...]]:
    return query(url, sql.SQL("select version_num from {}").format(sql.Identifier(audit.VERSION_TABLE)))


def start(execution_id: uuid.UUID, **overrides: object) -> audit.ExecutionStart:
    values: dict[str, object] = {
        "id": execution_id,
        "start_date": date(2024, 2, 1),
        "end_date": date(2024, 2, 29),
        "tenant_id": "tenant-001",
        "models": ["fact_orders", "fact_customers"],
    }
    values.update(overrides)
    return audit.ExecutionStart(**values)  # type: ignore[arg-type]


def try_migration_lock(url: str) -> bool:
    """Can another session take the migration lock right now? (released again at once)"""
    with psycopg.connect(url, autocommit=True) as conn:
        [(got,)] = conn.execute("select pg_try_advisory_lock(%s)", (audit._MIGRATION_LOCK_KEY,)).fetchall()
        if got:
            conn.execute("select pg_advisory_unlock(%s)", (audit._MIGRATION_LOCK_KEY,))
        return bool(got)


# ------------------------------------------------------------------ migrations


def test_migrations_create_the_table_and_the_model_matches_them(engine: sa.Engine, database_url: str) -> None:
    assert not table_exists(database_url, "public", "backfill_executions")
    assert audit.current_revision(engine) is None

    audit.upgrade(engine)

    assert audit.current_revision(engine) == head_revision()
    inspector = sa.inspect(engine)
    tables = set(inspector.get_table_names())
    assert {"backfill_executions", audit.VERSION_TABLE} <= tables
    assert "alembic_version" not in tables  # the application's own Alembic table name stays free

    # Autogenerate against the migrated database: the model describes exactly what the
    # migrations built (columns, types, nullability, server defaults, indexes).
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn,
            opts={"version_table": audit.VERSION_TABLE, "compare_type": True, "compare_server_default": True},
        )
        diff = compare_metadata(context, audit.Base.metadata)
    diff = [d for d in diff if audit.VERSION_TABLE not in repr(d)]
    assert diff == []

    # Autogenerate does not compare check constraints: compare their names here (their
    # behaviour is tested below).
    model_checks = {c.name for c in audit.BackfillExecution.__table__.constraints if isinstance(c, sa.CheckConstraint)}
    db_checks = {c["name"] for c in inspector.get_check_constraints("backfill_executions")}
    assert model_checks == db_checks == {"ck_backfill_executions_status", "ck_backfill_executions_kind"}
    assert inspector.get_pk_constraint("backfill_executions")["constrained_columns"] == ["id"]


def test_upgrade_is_idempotent(engine: sa.Engine, database_url: str) -> None:
    audit.upgrade(engine)
    audit.upgrade(engine)
    audit.ensure_schema(engine)
    assert version_rows(database_url) == [(head_revision(),)]


def test_concurrent_first_upgrades_all_succeed(database_url: str) -> None:
    # Parallel chunk Jobs starting together on a fresh database: the advisory lock lets one
    # migrate and the others find the work done. Each thread has its own engine (own pool).
    threads_count = 6
    barrier = threading.Barrier(threads_count)
    errors: list[BaseException] = []
    engines = [sa.create_engine(audit.sqlalchemy_url(database_url)) for _ in range(threads_count)]

    def migrate(engine: sa.Engine) -> None:
        try:
            barrier.wait(timeout=30)
            audit.upgrade(engine)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=migrate, args=(e,)) for e in engines]
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=120)
        assert not any(w.is_alive() for w in workers)
    finally:
        for e in engines:
            e.dispose()
    assert errors == []
    assert version_rows(database_url) == [(head_revision(),)]
    assert table_exists(database_url, "public", "backfill_executions")
    assert try_migration_lock(database_url)


def test_a_failed_migration_reports_its_cause_and_releases_the_lock(engine: sa.Engine, database_url: str) -> None:
    # A database that already has a backfill_executions table Alembic does not know about
    # (made by hand from the seed's docs, say): the first migration cannot create it.
    with psycopg.connect(database_url) as conn:
        conn.execute("create table backfill_executions (id uuid primary key, status text)")

    with pytest.raises(sa.exc.ProgrammingError, match="already exists"):
        audit.upgrade(engine)

    # The session-level advisory lock must not stay held by the pooled connection: every
    # other process's upgrade() would wait on it for as long as this one lives.
    assert try_migration_lock(database_url)


# ------------------------------------------------------------------ writes


def test_record_start_twice_with_one_id_keeps_one_row(migrated: sa.Engine, database_url: str) -> None:
    execution_id = uuid.uuid4()
    audit.record_start(migrated, start(execution_id))
    [first] = audit_rows(database_url)
    assert (first["id"], first["status"], first["kind"]) == (execution_id, "running", "run")
    assert first["models"] == ["fact_orders", "fact_customers"]
    assert first["tenant_id"] == "tenant-001"
    assert first["finished_at"] is None

    assert audit.record_finish(
        migrated, execution_id, "failed", duration_seconds=2.5, records_processed=7, error_message="x"
    )
    audit.record_start(migrated, start(execution_id))  # a restarted pod replays its start

    [again] = audit_rows(database_url)
    assert again["id"] == execution_id
    assert again["status"] == "running"
    # the previous attempt's outcome is cleared, its first start time kept
    assert (again["duration_seconds"], again["records_processed"], again["error_message"]) == (None, None, None)
    assert again["finished_at"] is None
    assert again["created_at"] == first["created_at"]
    assert again["updated_at"] > first["updated_at"]


def test_record_finish_sets_status_duration_records_and_error(migrated: sa.Engine, database_url: str) -> None:
    ok, bad, long = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    parent = uuid.uuid4()
    for execution_id in (ok, bad, long):
        audit.record_start(migrated, start(execution_id, kind="chunk", parent_id=parent, chunk_index=3, attempt=2))

    assert audit.record_finish(migrated, ok, "completed", duration_seconds=12.345, records_processed=1234)
    assert audit.record_finish(
        migrated,
        bad,
        "failed",
        duration_seconds=0.5,
        records_processed=None,
        error_message="window 2024-02-01..2024-02-29: fact_orders: division by zero",
    )
    assert audit.record_finish(
        migrated, long, "cancelled", duration_seconds=1.0, records_processed=0, error_message="e" * 20_000
    )

    rows = {r["id"]: r for r in audit_rows(database_url)}
    assert (rows[ok]["status"], rows[ok]["duration_seconds"], rows[ok]["records_processed"]) == (
        "completed",
        12.345,
        1234,
    )
    assert rows[ok]["error_message"] is None
    assert rows[bad]["status"] == "failed"
    assert rows[bad]["error_message"] == "window 2024-02-01..2024-02-29: fact_orders: division by zero"
    assert rows[bad]["records_processed"] is None
    assert rows[long]["status"] == "cancelled"
    assert len(rows[long]["error_message"]) == audit.MAX_ERROR_CHARS
    for row in rows.values():
        assert row["finished_at"] is not None and row["finished_at"] >= row["created_at"]
        assert (row["kind"], row["parent_id"], row["chunk_index"], row["attempt"]) == ("chunk", parent, 3, 2)

    # finishing a row that does not exist writes nothing and says so
    assert not audit.record_finish(migrated, uuid.uuid4(), "completed", duration_seconds=1.0, records_processed=1)
    assert len(audit_rows(database_url)) == 3
    with pytest.raises(ValueError, match="running"):
        audit.record_finish(migrated, ok, "running", duration_seconds=None, records_processed=None)  # type: ignore[arg-type]


def test_check_constraints_reject_unknown_status_and_kind(migrated: sa.Engine, database_url: str) -> None:
    execution_id = uuid.uuid4()
    audit.record_start(migrated, start(execution_id))

    with pytest.raises(sa.exc.IntegrityError, match="ck_backfill_executions_status"):
        audit.record_finish(migrated, execution_id, "exploded", duration_seconds=1.0, records_processed=1)  # type: ignore[arg-type]
    with pytest.raises(sa.exc.IntegrityError, match="ck_backfill_executions_kind"):
        audit.record_start(migrated, start(uuid.uuid4(), kind="batch"))
    with pytest.raises(psycopg.errors.CheckViolation), psycopg.connect(database_url) as conn:
        conn.execute("update backfill_executions set status = 'done' where id = %s", (execution_id,))

    [row] = audit_rows(database_url)
    assert (row["id"], row["status"]) == (execution_id, "running")


def test_history_is_newest_first_and_filters(migrated: sa.Engine, database_url: str) -> None:
    parent = uuid.uuid4()
    ids = [uuid.uuid4() for _ in range(5)]
    for n, execution_id in enumerate(ids):
        audit.record_start(migrated, start(execution_id, parent_id=parent if n % 2 else None))
        if n < 4:
            status = "failed" if n % 2 else "completed"
            audit.record_finish(migrated, execution_id, status, duration_seconds=1.0, records_processed=n)
        with psycopg.connect(database_url) as conn:
            conn.execute(
                "update backfill_executions"
                " set created_at = timestamptz '2024-03-01 00:00:00+00' + %s * interval '1 minute' where id = %s",
                (n, execution_id),
            )

    assert [r.id for r in audit.history(migrated)] == ids[::-1]
    assert [r.id for r in audit.history(migrated, limit=2)] == ids[:2:-1]
    assert [r.id for r in audit.history(migrated, status="failed")] == [ids[3], ids[1]]
    assert [r.id for r in audit.history(migrated, parent_id=parent)] == [ids[3], ids[1]]
    assert [r.id for r in audit.history(migrated, status="running")] == [ids[4]]
    got = audit.get(migrated, ids[3])
    assert got is not None and (got.status, got.records_processed) == ("failed", 3)
    assert audit.get(migrated, uuid.uuid4()) is None


@pytest.fixture
def two_engines(database_url: str) -> Iterator[tuple[sa.Engine, sa.Engine]]:
    engines = (sa.create_engine(audit.sqlalchemy_url(database_url)), audit.engine_for(register_url(database_url)))
    yield engines
    engines[0].dispose()


def test_ensure_schema_migrates_once_per_process(two_engines: tuple[sa.Engine, sa.Engine], database_url: str) -> None:
    other, cli_engine = two_engines
    audit.ensure_schema(cli_engine)
    assert audit.current_revision(other) == head_revision()
    audit.ensure_schema(cli_engine)  # cached: no second migration run, still fine
    assert version_rows(database_url) == [(head_revision(),)]


def test_head_revision_constant_is_the_newest_migration() -> None:
    # ensure_schema skips Alembic when the database is at HEAD_REVISION: a stale constant would
    # leave a new migration unapplied.
    assert head_revision() == audit.HEAD_REVISION


def test_ensure_schema_migrates_a_database_behind_head_and_skips_one_at_head(
    engine: sa.Engine, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``audit.upgrade`` is wrapped (not replaced) to count the times Alembic is invoked."""
    upgrades: list[str] = []
    real_upgrade = audit.upgrade
    monkeypatch.setattr(audit, "upgrade", lambda e, revision="head": upgrades.append(revision) or real_upgrade(e))
    monkeypatch.setattr(audit, "_upgraded", set())
    audit.ensure_schema(engine)  # empty database: migrates
    assert upgrades == ["head"] and version_rows(database_url) == [(audit.HEAD_REVISION,)]

    monkeypatch.setattr(audit, "_upgraded", set())  # a new process
    audit.ensure_schema(engine)
    assert upgrades == ["head"]  # at head: Alembic is not involved

    execute(database_url, sql.SQL("update {} set version_num = 'older'").format(sql.Identifier(audit.VERSION_TABLE)))
    monkeypatch.setattr(audit, "_upgraded", set())
    with pytest.raises(Exception, match="older"):  # not at head: Alembic runs (and knows no 'older')
        audit.ensure_schema(engine)
    assert upgrades == ["head", "head"]


# ------------------------------------------------------------------ one id, one execution


@pytest.mark.parametrize(
    "other",
    [
        {"tenant_id": "tenant-002"},
        {"tenant_id": None},
        {"start_date": date(2024, 2, 2)},
        {"end_date": date(2024, 3, 31)},
        {"models": ["fact_orders"]},
        {"kind": "chunk", "parent_id": uuid.UUID(int=7)},
    ],
    ids=["tenant", "all-tenants", "start", "end", "models", "parent"],
)
def test_an_execution_id_of_another_run_is_refused_and_its_row_kept(
    migrated: sa.Engine, database_url: str, other: dict[str, object]
) -> None:
    execution_id = uuid.uuid4()
    audit.record_start(migrated, start(execution_id))
    audit.record_finish(migrated, execution_id, "completed", duration_seconds=3.0, records_processed=99)
    [before] = audit_rows(database_url)

    with pytest.raises(audit.ExecutionConflict, match=f"execution id {execution_id} already belongs to another"):
        audit.record_start(migrated, start(execution_id, **other))

    assert audit_rows(database_url) == [before]


def test_replaying_the_same_run_under_its_id_still_restarts_it(migrated: sa.Engine, database_url: str) -> None:
    # The operator's retry of one chunk attempt (a restarted pod) replays exactly the same start.
    execution_id, parent = uuid.uuid4(), uuid.uuid4()
    chunk = start(execution_id, kind="chunk", parent_id=parent, tenant_id=None, chunk_index=2, attempt=1)
    audit.record_start(migrated, chunk)
    audit.record_finish(migrated, execution_id, "failed", duration_seconds=1.0, records_processed=None)
    audit.record_start(migrated, chunk)
    [row] = audit_rows(database_url)
    assert (row["status"], row["tenant_id"], row["parent_id"]) == ("running", None, parent)


# ------------------------------------------------------------------ heartbeats


def set_heartbeat(url: str, execution_id: uuid.UUID, ago: str | None) -> None:
    execute(
        url,
        "update backfill_executions set heartbeat_at = now() - %s::interval, updated_at = now() - %s::interval"
        " where id = %s",
        ago,
        ago or "1 hour",
        execution_id,
    )


def test_a_running_row_whose_heartbeat_is_stale_shows_as_abandoned(migrated: sa.Engine, database_url: str) -> None:
    alive, stale, old_style, done = (uuid.uuid4() for _ in range(4))
    for execution_id in (alive, stale, old_style, done):
        audit.record_start(migrated, start(execution_id))
    audit.record_finish(migrated, done, "completed", duration_seconds=1.0, records_processed=1)
    set_heartbeat(database_url, stale, f"{audit.STALE_AFTER_SECONDS + 5} seconds")
    set_heartbeat(database_url, old_style, None)  # a row from before heartbeats: its last update counts
    set_heartbeat(database_url, done, "1 day")  # finished rows are what they are, however old

    shown = {r.id: r.effective_status for r in audit.history(migrated)}
    assert shown == {alive: "running", stale: "abandoned", old_style: "abandoned", done: "completed"}
    assert {r.id for r in audit.history(migrated, status="abandoned")} == {stale, old_style}
    assert [r.id for r in audit.history(migrated, status="running")] == [alive]
    # The README's query for them, verbatim.
    readme = (
        "SELECT id, start_date, end_date, heartbeat_at FROM backfill_executions\n"
        "WHERE status = 'running' AND coalesce(heartbeat_at, updated_at) < now() - interval '120 seconds';"
    )
    assert readme in (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert {row[0] for row in query(database_url, readme)} == {stale, old_style}
    # Nothing is rewritten: the stored status stays what the process last wrote.
    assert {r["id"]: r["status"] for r in audit_rows(database_url)}[stale] == "running"


def test_a_beat_refreshes_a_running_row_and_leaves_finished_ones(migrated: sa.Engine, database_url: str) -> None:
    running, done = uuid.uuid4(), uuid.uuid4()
    for execution_id in (running, done):
        audit.record_start(migrated, start(execution_id))
        set_heartbeat(database_url, execution_id, "1 hour")
    audit.record_finish(migrated, done, "failed", duration_seconds=1.0, records_processed=None)
    before = {r["id"]: r["heartbeat_at"] for r in audit_rows(database_url)}

    audit.beat(migrated, running)
    audit.beat(migrated, done)

    after = {r["id"]: r["heartbeat_at"] for r in audit_rows(database_url)}
    assert after[running] > before[running]
    assert after[done] == before[done]
    assert audit.get(migrated, running).effective_status == "running"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("revision", "added"),
    [
        ("0001", {"heartbeat_at": None}),  # the heartbeat migration (0003) and those after it
        ("0003", {"dry_run": False, "estimated_source_rows": None}),  # a real run, without an estimate
    ],
)
def test_later_migrations_keep_existing_rows(
    engine: sa.Engine, database_url: str, revision: str, added: dict[str, object]
) -> None:
    audit.upgrade(engine, revision)
    execute(
        database_url,
        "insert into backfill_executions (id, start_date, end_date, status) values (%s, '2024-01-01', '2024-01-31',"
        " 'completed')",
        uuid.UUID(int=1),
    )
    audit.upgrade(engine)
    [row] = audit_rows(database_url)
    assert (row["id"], row["status"]) == (uuid.UUID(int=1), "completed")
    assert {k: row[k] for k in added} == added
    assert version_rows(database_url) == [(audit.HEAD_REVISION,)]


def test_history_refuses_a_negative_limit(migrated: sa.Engine) -> None:
    with pytest.raises(ValueError, match="limit"):
        audit.history(migrated, limit=-1)


def test_a_dry_run_row_keeps_its_estimate_and_a_replay_of_its_id_starts_over(
    migrated: sa.Engine, database_url: str
) -> None:
    parent, chunk, other = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    dry = start(chunk, kind="chunk", parent_id=parent, chunk_index=0, attempt=1, dry_run=True)
    audit.record_start(migrated, dry)
    assert audit.record_finish(migrated, chunk, "completed", duration_seconds=0.2, records_processed=0,
                               estimated_source_rows=10**12)  # fmt: skip  # bigint
    audit.record_start(migrated, start(other, kind="chunk", parent_id=parent, chunk_index=1, attempt=1, dry_run=True))
    assert audit.record_finish(migrated, other, "failed", duration_seconds=0.1, records_processed=0,
                               error_message="compilation failed", estimated_source_rows=7)  # fmt: skip
    rows = {r["id"]: r for r in audit_rows(database_url)}
    assert (rows[chunk]["dry_run"], rows[chunk]["estimated_source_rows"]) == (True, 10**12)
    # Only completed dry-run chunks count in the backfill's summary.
    reported, total, largest = audit.dry_run_estimates(migrated, parent)
    assert (reported, total) == (1, 10**12)
    assert largest is not None and (largest.chunk_index, largest.rows) == (0, 10**12)

    # The same id started again (a restarted Pod) starts over: no stale estimate.
    audit.record_start(migrated, dry)
    again = {r["id"]: r for r in audit_rows(database_url)}[chunk]
    assert (again["status"], again["dry_run"], again["estimated_source_rows"]) == ("running", True, None)
    assert audit.dry_run_estimates(migrated, parent) == (0, 0, None)
