"""Create backfill_executions.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "backfill_executions",
        sa.Column("id", pg.UUID(as_uuid=True), primary_key=True),
        sa.Column("parent_id", pg.UUID(as_uuid=True), nullable=True),
        sa.Column("kind", sa.Text, nullable=False, server_default="run"),
        sa.Column("tenant_id", sa.Text, nullable=True),
        sa.Column("start_date", sa.Date, nullable=False),
        sa.Column("end_date", sa.Date, nullable=False),
        sa.Column("models", pg.ARRAY(sa.Text), nullable=False, server_default="{}"),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("duration_seconds", sa.Float, nullable=True),
        sa.Column("records_processed", sa.BigInteger, nullable=True),
        sa.Column("error_message", sa.Text, nullable=True),
        sa.Column("backfill_name", sa.Text, nullable=True),
        sa.Column("backfill_namespace", sa.Text, nullable=True),
        sa.Column("backfill_uid", sa.Text, nullable=True),
        sa.Column("chunk_index", sa.Integer, nullable=True),
        sa.Column("attempt", sa.Integer, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status in ('running', 'completed', 'failed', 'cancelled')", name="ck_backfill_executions_status"
        ),
        sa.CheckConstraint("kind in ('run', 'backfill', 'chunk')", name="ck_backfill_executions_kind"),
    )
    op.create_index("ix_backfill_executions_created_at", "backfill_executions", ["created_at"])
    op.create_index("ix_backfill_executions_status_created_at", "backfill_executions", ["status", "created_at"])
    op.create_index("ix_backfill_executions_parent_id", "backfill_executions", ["parent_id"])


def downgrade() -> None:
    op.drop_table("backfill_executions")
