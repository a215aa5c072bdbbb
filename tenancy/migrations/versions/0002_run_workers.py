"""Runs started over HTTP: owner tenant, worker PID and host, heartbeat.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql import sqltypes

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("training_run") as batch:
        batch.add_column(
            sa.Column("owner_tenant_id", sqltypes.AutoString(length=64), nullable=True)
        )
        batch.add_column(sa.Column("worker_pid", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("worker_host", sqltypes.AutoString(length=255), nullable=True))
        batch.add_column(sa.Column("heartbeat_at", sqltypes.UTCDateTime(), nullable=True))
        batch.create_index(
            batch.f("ix_training_run_owner_tenant_id"), ["owner_tenant_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("training_run") as batch:
        batch.drop_index(batch.f("ix_training_run_owner_tenant_id"))
        for column in ("heartbeat_at", "worker_host", "worker_pid", "owner_tenant_id"):
            batch.drop_column(column)
