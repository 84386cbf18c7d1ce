"""Add backfill_executions.heartbeat_at: when a running execution last said it was alive.

A process killed with SIGKILL, or that lost its database, cannot close its row; a ``running``
row whose heartbeat is stale is shown as abandoned instead of running for ever.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("backfill_executions", sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("backfill_executions", "heartbeat_at")
