"""Node identity: federation node keys enrolled for a tenant.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass  # filled in by the change that needs it (kept in the chain so revisions stay ordered)


def downgrade() -> None:
    pass
