"""Run hygiene: who cancelled a run.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass  # filled in by the change that needs it (kept in the chain so revisions stay ordered)


def downgrade() -> None:
    pass
