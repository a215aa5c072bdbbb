"""Every table of ``privacy`` in one list, and their creation (tests and a fresh database;
production databases are migrated by ``tenancy.migrations``)."""

from __future__ import annotations

from sqlalchemy import Engine
from sqlmodel import SQLModel

from privacy.heads import SignedHead
from privacy.ledger import BudgetChange, LedgerHead, PrivacyEvent
from privacy.reservations import BudgetReservation


def ledger_tables() -> list[type[SQLModel]]:
    """Every table of ``privacy``: the chains, their heads, signed heads, reservations."""
    return [PrivacyEvent, BudgetChange, LedgerHead, SignedHead, BudgetReservation]


def create_tables(engine: Engine) -> None:
    """Create the ledger's tables where they are missing."""
    SQLModel.metadata.create_all(
        engine,
        tables=[t.__table__ for t in ledger_tables()],  # type: ignore[attr-defined]
    )
