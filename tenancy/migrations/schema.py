"""The tables the migrations manage: tenancy's, and the privacy ledger's.

The ledger's tables are declared by ``privacy`` (listed in ``privacy.db``) and migrated
here, with the rest of the platform database; they are named, not imported (tenancy imports
nothing of ours). Whoever runs the migrations imports ``privacy.db`` first, so their tables
are in SQLModel's metadata (``fedtext.bootstrap.upgrade_schema`` does).
"""

from __future__ import annotations

from sqlalchemy import MetaData
from sqlmodel import SQLModel

import tenancy.governance
import tenancy.nodes  # registers node_key in SQLModel's metadata
import tenancy.tables  # noqa: F401  (registers tenancy's tables in SQLModel's metadata)

TENANCY_TABLES = (
    "tenant",
    "api_key",
    "data_key",
    "model_version",
    "training_run",
    "round_metric",
    "federation_partner",
    "federation_partner_unmatched",
    "blob",
    "tenancy_change",
    "tenant_policy",
    "node_key",
)
PRIVACY_TABLES = (
    "privacy_event",
    "privacy_budget_change",
    "privacy_ledger_head",
    "privacy_signed_head",
    "privacy_reservation",
)
TABLES = TENANCY_TABLES + PRIVACY_TABLES


def target_metadata() -> MetaData:
    """A MetaData holding exactly the platform's tables (as the SQLModel classes declare)."""
    md = MetaData()
    for table in SQLModel.metadata.sorted_tables:
        if table.name in TABLES:
            table.to_metadata(md)
    missing = set(TABLES) - set(md.tables)
    if missing:  # a renamed table must come with a migration
        raise RuntimeError(
            f"Tables missing from the SQLModel metadata: {sorted(missing)} (import "
            "privacy.db before migrating)"
        )
    return md
