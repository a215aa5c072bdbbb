"""Tenant governance: each tenant's deploy policy and floor for run settings, and the
settings that applied to it recorded on its ledger entries.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql import sqltypes

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tenant_policy",
        sa.Column("tenant_id", sqltypes.AutoString(), nullable=False),
        sa.Column("deploy", sqltypes.AutoString(length=16), nullable=False),
        sa.Column("require_secure_mode", sa.Boolean(), nullable=False),
        sa.Column("max_epsilon", sa.Float(), nullable=True),
        sa.Column("families", sqltypes.AutoString(length=200), nullable=False),
        sa.Column("dataset", sqltypes.AutoString(length=63), nullable=False),
        sa.Column("updated_at", sqltypes.UTCDateTime(), nullable=False),
        sa.Column("updated_by", sqltypes.AutoString(length=100), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenant.id"]),
        sa.PrimaryKeyConstraint("tenant_id"),
    )
    with op.batch_alter_table("privacy_event") as batch:
        # Entries written before it record "{}", which their hashes do not cover.
        batch.add_column(
            sa.Column("applied_json", sqltypes.AutoString(), nullable=False, server_default="{}")
        )


def downgrade() -> None:
    with op.batch_alter_table("privacy_event") as batch:
        batch.drop_column("applied_json")
    op.drop_table("tenant_policy")
