"""Budget reservations: a run's planned releases held against a tenant's budget.

A run reserves what it plans to spend before anything is dispatched (at submission an
estimate from its target epsilon, at planning its exact releases); every later budget
decision for the tenant counts other runs' uncharged reservations as spent, so two
runs can never both fit one remainder. A reservation holds only while its run is
active: the caller says which runs are (``privacy`` does not know the run table), so a
run that ends by any path (completed, failed, cancelled, interrupted) frees it.
Reservations are written under ``privacy.ledger.lock_tenant``, like charges.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import UniqueConstraint
from sqlmodel import Field, Session, SQLModel, select

from privacy.ledger import PURPOSES, PrivacyEvent, check_dataset
from privacy.params import DPParams

ESTIMATE = "estimate"  # a submission-time stand-in for the exact plan (round 0)


@dataclass(frozen=True)
class PlannedRelease:
    """One release a run plans for a tenant: its round, purpose and DP parameters."""

    round: int
    purpose: str
    params: DPParams

    def to_json(self) -> dict[str, object]:
        return {
            "round": self.round,
            "purpose": self.purpose,
            "params": dataclasses.asdict(self.params),
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> PlannedRelease:
        return cls(int(data["round"]), str(data["purpose"]), DPParams(**data["params"]))  # type: ignore[arg-type,call-overload]


class BudgetReservation(SQLModel, table=True):
    """What one run holds of one tenant's budget until it ends."""

    __tablename__ = "privacy_reservation"
    __table_args__ = (UniqueConstraint("run_id", "tenant_id"),)
    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(index=True, max_length=64)
    tenant_id: str = Field(index=True, max_length=64)
    dataset: str = Field(max_length=63)
    stage: str = Field(max_length=16)  # "estimate" (submission) or "plan" (exact)
    releases_json: str
    created_at: datetime

    def releases(self) -> list[PlannedRelease]:
        return [PlannedRelease.from_json(r) for r in json.loads(self.releases_json)]


def reserve(
    session: Session,
    *,
    run_id: str,
    tenant_id: str,
    dataset: str,
    releases: Sequence[PlannedRelease],
    stage: str,
) -> BudgetReservation:
    """Record (or replace) the run's reservation of the tenant's budget; the caller holds
    ``lock_tenant`` and has checked the budget, and commits."""
    check_dataset(dataset)
    for r in releases:
        if r.purpose not in (*PURPOSES, ESTIMATE):
            raise ValueError(f"Unknown release purpose {r.purpose!r}.")
    body = json.dumps([r.to_json() for r in releases])
    now = datetime.now(UTC).replace(microsecond=0)
    row = session.exec(
        select(BudgetReservation).where(
            BudgetReservation.run_id == run_id, BudgetReservation.tenant_id == tenant_id
        )
    ).first()
    if row is None:
        row = BudgetReservation(
            run_id=run_id,
            tenant_id=tenant_id,
            dataset=dataset,
            stage=stage,
            releases_json=body,
            created_at=now,
        )
    else:
        row.dataset, row.stage, row.releases_json, row.created_at = dataset, stage, body, now
    session.add(row)
    session.flush()
    return row


def uncharged(session: Session, row: BudgetReservation) -> list[PlannedRelease]:
    """The reservation's releases its run has not charged yet (matched by round and purpose)."""
    return pending(session, run_id=row.run_id, tenant_id=row.tenant_id, releases=row.releases())


def pending(
    session: Session, *, run_id: str, tenant_id: str, releases: Sequence[PlannedRelease]
) -> list[PlannedRelease]:
    """Those of ``releases`` that ``run_id`` has not charged ``tenant_id`` yet (matched by
    round and purpose)."""
    charged = Counter(
        (e.round, e.purpose)
        for e in session.exec(
            select(PrivacyEvent).where(
                PrivacyEvent.run_id == run_id, PrivacyEvent.tenant_id == tenant_id
            )
        )
    )
    left = []
    for r in releases:
        if charged[(r.round, r.purpose)] > 0:
            charged[(r.round, r.purpose)] -= 1
        else:
            left.append(r)
    return left


def drop_reservation(session: Session, *, run_id: str, tenant_id: str) -> None:
    """Remove ``run_id``'s reservation of ``tenant_id``'s budget, if it has one."""
    row = session.exec(
        select(BudgetReservation).where(
            BudgetReservation.run_id == run_id, BudgetReservation.tenant_id == tenant_id
        )
    ).first()
    if row is not None:
        session.delete(row)
        session.flush()


def outstanding(
    session: Session,
    tenant_id: str,
    *,
    active_runs: Collection[str],
    exclude_run: str | None = None,
) -> list[tuple[str, DPParams]]:
    """(dataset, release) of every uncharged release reserved for the tenant by an active
    run other than ``exclude_run``."""
    rows = session.exec(select(BudgetReservation).where(BudgetReservation.tenant_id == tenant_id))
    out = []
    for row in rows:
        if row.run_id == exclude_run or row.run_id not in active_runs:
            continue
        out += [(row.dataset, r.params) for r in uncharged(session, row)]
    return out
