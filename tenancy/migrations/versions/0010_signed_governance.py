"""Signed governance: consents, tenant policies and model versions (deployment included).

``federation_partner``, ``tenant_policy`` and ``model_version`` get a nullable
``signature`` (Ed25519 by the platform's signing key, tenancy/signing.py), as the rows of
revisions 0006 and 0007. Rows written before this revision stay unsigned, and unsigned
rows are not acted on: a consent is no consent, a policy falls back to refusing every run
that includes its tenant, a deployed version is not served. The operator signs them once
with ``fedtext audit sign-existing`` after ``fedtext audit verify``.

``federation_partner_unmatched`` keeps names an admin listed as partners that were no
tenant's (so the consent route answers them as it answers tenant names); they grant nothing.
``node_key.proven`` records that a key's holder signed the request that enrolled it (such an
enrollment takes the key over from an unproven one of another tenant).

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql import sqltypes

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

SIGNED = ("federation_partner", "tenant_policy", "model_version")


def upgrade() -> None:
    for table in SIGNED:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("signature", sqltypes.AutoString(length=160), nullable=True))
    with op.batch_alter_table("node_key") as batch:
        batch.add_column(
            sa.Column("proven", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    op.create_table(
        "federation_partner_unmatched",
        sa.Column("tenant_id", sqltypes.AutoString(), nullable=False),
        sa.Column("name", sqltypes.AutoString(length=63), nullable=False),
        sa.Column("created_at", sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenant.id"]),
        sa.PrimaryKeyConstraint("tenant_id", "name"),
    )


def downgrade() -> None:
    op.drop_table("federation_partner_unmatched")
    with op.batch_alter_table("node_key") as batch:
        batch.drop_column("proven")
    for table in SIGNED:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("signature")
