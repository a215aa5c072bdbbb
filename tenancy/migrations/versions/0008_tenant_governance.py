"""Tenant governance: each tenant's deploy policy and floor for run settings.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass  # filled in by the change that needs it (kept in the chain so revisions stay ordered)


def downgrade() -> None:
    pass
