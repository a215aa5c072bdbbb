"""Serving replicas: encrypted blobs in the database, and a log of tenancy changes.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql import sqltypes

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "blob",
        sa.Column("key", sqltypes.AutoString(length=255), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_table(
        "tenancy_change",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sqltypes.AutoString(length=32), nullable=False),
        sa.Column("tenant_id", sqltypes.AutoString(length=64), nullable=False),
        sa.Column("name", sqltypes.AutoString(length=63), nullable=True),
        sa.Column("origin", sqltypes.AutoString(length=64), nullable=False),
        sa.Column("created_at", sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_tenancy_change_created_at"), "tenancy_change", ["created_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_tenancy_change_created_at"), table_name="tenancy_change")
    op.drop_table("tenancy_change")
    op.drop_table("blob")
