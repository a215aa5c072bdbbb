"""Authorship: signatures on ledger entries, budget changes and key rows.

Each row of ``privacy_event``, ``privacy_budget_change`` and ``api_key`` gets a nullable
``signature`` (Ed25519 by the platform's signing key, tenancy/signing.py). Rows written
before this revision stay unsigned: ``fedtext audit verify`` names them, and the operator
signs them once with ``fedtext audit sign-existing`` after checking the chains (a key row
without a valid signature does not authenticate).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql import sqltypes

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

SIGNED = ("privacy_event", "privacy_budget_change", "api_key")


def upgrade() -> None:
    for table in SIGNED:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("signature", sqltypes.AutoString(length=160), nullable=True))


def downgrade() -> None:
    for table in SIGNED:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("signature")
