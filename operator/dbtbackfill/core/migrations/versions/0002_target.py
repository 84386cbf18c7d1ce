"""backfill_executions.target: the dbt target the data went to.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: rows written before it, and the operator's backfill rows, name no target.
    op.add_column("backfill_executions", sa.Column("target", pg.JSONB, nullable=True))


def downgrade() -> None:
    op.drop_column("backfill_executions", "target")
