"""Run hygiene: who cancelled a run.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql import sqltypes

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("training_run") as batch:
        batch.add_column(sa.Column("cancelled_by", sqltypes.AutoString(length=255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("training_run") as batch:
        batch.drop_column("cancelled_by")
