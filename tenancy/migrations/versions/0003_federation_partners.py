"""Consent between tenants: who may start runs that include whom.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql import sqltypes

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "federation_partner",
        sa.Column("tenant_id", sqltypes.AutoString(), nullable=False),
        sa.Column("partner_id", sqltypes.AutoString(), nullable=False),
        sa.Column("created_at", sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenant.id"]),
        sa.ForeignKeyConstraint(["partner_id"], ["tenant.id"]),
        sa.PrimaryKeyConstraint("tenant_id", "partner_id"),
    )


def downgrade() -> None:
    op.drop_table("federation_partner")
