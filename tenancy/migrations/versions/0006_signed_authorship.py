"""Authorship: signatures on ledger entries, budget changes and key rows.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass  # filled in by the change that needs it (kept in the chain so revisions stay ordered)


def downgrade() -> None:
    pass
