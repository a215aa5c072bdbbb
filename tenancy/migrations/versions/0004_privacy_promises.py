"""Privacy promises: release purpose, chain heads (the lock), signed heads, reservations.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql import sqltypes

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("privacy_event") as batch:
        # Existing entries were all DP-SGD releases; their hashes do not cover the column.
        batch.add_column(
            sa.Column(
                "purpose",
                sqltypes.AutoString(length=16),
                nullable=False,
                server_default="train",
            )
        )
    with op.batch_alter_table("round_metric") as batch:
        # Training metrics no longer leave a node: a "train" row has no loss or accuracy.
        batch.alter_column("loss", existing_type=sa.Float(), nullable=True)
        batch.alter_column("accuracy", existing_type=sa.Float(), nullable=True)
    op.create_table(
        "privacy_ledger_head",
        sa.Column("tenant_id", sqltypes.AutoString(length=64), nullable=False),
        sa.Column("ledger_seq", sa.Integer(), nullable=False),
        sa.Column("ledger_hash", sqltypes.AutoString(length=64), nullable=False),
        sa.Column("budget_seq", sa.Integer(), nullable=False),
        sa.Column("budget_hash", sqltypes.AutoString(length=64), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id"),
    )
    op.create_table(
        "privacy_signed_head",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sqltypes.AutoString(length=64), nullable=False),
        sa.Column("created_at", sqltypes.UTCDateTime(), nullable=False),
        sa.Column("body", sqltypes.AutoString(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_privacy_signed_head_tenant_id"), "privacy_signed_head", ["tenant_id"])
    op.create_table(
        "privacy_reservation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sqltypes.AutoString(length=64), nullable=False),
        sa.Column("tenant_id", sqltypes.AutoString(length=64), nullable=False),
        sa.Column("dataset", sqltypes.AutoString(length=63), nullable=False),
        sa.Column("stage", sqltypes.AutoString(length=16), nullable=False),
        sa.Column("releases_json", sqltypes.AutoString(), nullable=False),
        sa.Column("created_at", sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("run_id", "tenant_id"),
    )
    op.create_index(op.f("ix_privacy_reservation_run_id"), "privacy_reservation", ["run_id"])
    op.create_index(op.f("ix_privacy_reservation_tenant_id"), "privacy_reservation", ["tenant_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_privacy_reservation_tenant_id"), table_name="privacy_reservation")
    op.drop_index(op.f("ix_privacy_reservation_run_id"), table_name="privacy_reservation")
    op.drop_table("privacy_reservation")
    op.drop_index(op.f("ix_privacy_signed_head_tenant_id"), table_name="privacy_signed_head")
    op.drop_table("privacy_signed_head")
    op.drop_table("privacy_ledger_head")
    with op.batch_alter_table("privacy_event") as batch:
        batch.drop_column("purpose")
    with op.batch_alter_table("round_metric") as batch:
        batch.alter_column("loss", existing_type=sa.Float(), nullable=False)
        batch.alter_column("accuracy", existing_type=sa.Float(), nullable=False)
