"""The tables the migrations manage: tenancy's and the privacy ledger's."""

from __future__ import annotations

from sqlalchemy import MetaData

import privacy.ledger
import privacy.reservations
import tenancy.tables

TABLES = (
    "tenant",
    "api_key",
    "data_key",
    "model_version",
    "training_run",
    "round_metric",
    "federation_partner",
    privacy.ledger.PrivacyEvent.__tablename__,
    privacy.ledger.BudgetChange.__tablename__,
    privacy.ledger.LedgerHead.__tablename__,
    privacy.ledger.SignedHead.__tablename__,
    privacy.reservations.BudgetReservation.__tablename__,
)


def target_metadata() -> MetaData:
    """A MetaData holding exactly the platform's tables (as the SQLModel classes declare)."""
    md = MetaData()
    for table in tenancy.tables.SQLModel.metadata.sorted_tables:
        if table.name in TABLES:
            table.to_metadata(md)
    missing = set(TABLES) - set(md.tables)
    if missing:  # a renamed table must come with a migration
        raise RuntimeError(f"Tables missing from the SQLModel metadata: {sorted(missing)}")
    return md
