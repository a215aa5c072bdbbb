"""Node identity: federation node keys enrolled for a tenant.

Each enrollment row carries ``signature`` (Ed25519 by the platform's signing key, as the
rows of revision 0006; tenancy/signing.py): the coordinator believes only a signed row.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql import sqltypes

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "node_key",
        sa.Column("fingerprint", sqltypes.AutoString(length=64), nullable=False),
        sa.Column("tenant_id", sqltypes.AutoString(), nullable=False),
        sa.Column("public_key", sqltypes.AutoString(), nullable=False),
        sa.Column("enrolled_by", sqltypes.AutoString(length=255), nullable=False),
        sa.Column("created_at", sqltypes.UTCDateTime(), nullable=False),
        sa.Column("revoked_at", sqltypes.UTCDateTime(), nullable=True),
        sa.Column("signature", sqltypes.AutoString(length=160), nullable=True),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenant.id"]),
        sa.PrimaryKeyConstraint("fingerprint"),
    )
    op.create_index(op.f("ix_node_key_tenant_id"), "node_key", ["tenant_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_node_key_tenant_id"), table_name="node_key")
    op.drop_table("node_key")
