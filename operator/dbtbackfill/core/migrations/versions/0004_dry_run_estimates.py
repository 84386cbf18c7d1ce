"""Add backfill_executions.dry_run and .estimated_source_rows: what a dry run estimated.

A dry run with an execution id (every operator chunk of a ``spec.dryRun`` backfill) records its
planner estimate of the source rows it would read, where the operator reads it for the
backfill's ``status.costEstimate``. ``dry_run`` keeps those rows out of the ETA's past durations.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("backfill_executions", sa.Column("dry_run", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.add_column("backfill_executions", sa.Column("estimated_source_rows", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column("backfill_executions", "estimated_source_rows")
    op.drop_column("backfill_executions", "dry_run")
