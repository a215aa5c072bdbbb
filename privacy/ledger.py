"""Append-only privacy ledger: one row per DP release, hash-chained per tenant.

Rows keep the raw mechanism parameters, never only an epsilon, so an auditor can
recompute every figure with an independent accountant. Budget changes are kept in
a second chain per tenant (``BudgetChange``), so raising a budget is as
tamper-evident as spending it. Nothing here updates or deletes a row; the ORM
refuses to (``AppendOnlyViolation``), and an edit made behind its back (raw SQL)
breaks the chain, which ``verify_chain`` reports.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from typing import Any, ClassVar

from sqlalchemy import Engine, UniqueConstraint, event
from sqlmodel import Field, Session, SQLModel, col, select

from privacy.accounting import DEFAULT_ACCOUNTANT, accountant_version, compose_epsilon
from privacy.params import DPParams

GENESIS = "0" * 64
DEFAULT_DATASET = "default"
PRIVACY_UNIT = "example"  # one training example of one tenant's dataset
_DATASET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class LedgerError(Exception):
    """Base class for ledger errors."""


class AppendOnlyViolation(LedgerError):
    """Something tried to update or delete a ledger row through the ORM."""


def check_dataset(name: str) -> str:
    """``name`` if it is a valid dataset name, else ``ValueError`` saying what is allowed."""
    if not isinstance(name, str) or not _DATASET.match(name):
        raise ValueError(
            f"Invalid dataset name {name!r}: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit."
        )
    return name


def utc_seconds(moment: datetime) -> datetime:
    """Aware UTC to the second: what SQLite and PostgreSQL both store and return unchanged."""
    aware = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return aware.replace(microsecond=0)


def canonical_time(moment: datetime) -> str:
    """ISO 8601 in UTC with ``+00:00``; a naive value is UTC (never local time)."""
    aware = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return aware.isoformat()


def canonical_digest(data: dict[str, Any]) -> str:
    """SHA-256 hex of ``data`` as canonical JSON (sorted keys, no spaces).

    Floats are hashed as ``repr`` strings (shortest round-trip form) and datetimes as
    ``canonical_time``, so an auditor recomputes the same bytes from an export.
    """
    norm: dict[str, Any] = {}
    for name, value in data.items():
        if isinstance(value, datetime):
            value = canonical_time(value)
        elif isinstance(value, float):
            value = repr(value)
        norm[name] = value
    canonical = json.dumps(norm, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class PrivacyEvent(SQLModel, table=True):
    """One DP release (one round of one tenant), as charged at dispatch."""

    __tablename__ = "privacy_event"
    # A second writer racing for the same seq fails instead of forking the chain.
    __table_args__ = (UniqueConstraint("tenant_id", "seq"),)
    HASHED: ClassVar[tuple[str, ...]] = (
        "tenant_id", "dataset", "seq", "run_id", "round", "created_at", "privacy_unit",
        "mechanism", "noise_multiplier", "sample_rate", "steps", "clip_norm", "delta",
        "accountant", "accountant_version", "fedtext_version", "spec_sha256", "prev_hash",
    )  # fmt: skip

    id: int | None = Field(default=None, primary_key=True)
    # No foreign key: the ledger outlives a deleted tenant (auditors keep reading it).
    tenant_id: str = Field(index=True, max_length=64)
    dataset: str = Field(default=DEFAULT_DATASET, max_length=63)
    seq: int  # position in this tenant's chain, from 1
    run_id: str = Field(index=True, max_length=64)
    round: int
    created_at: datetime
    privacy_unit: str = PRIVACY_UNIT
    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    delta: float
    accountant: str
    accountant_version: str
    fedtext_version: str
    spec_sha256: str = Field(max_length=64)
    prev_hash: str = Field(max_length=64)
    entry_hash: str = Field(max_length=64)

    def params(self) -> DPParams:
        return DPParams(
            self.noise_multiplier,
            self.sample_rate,
            self.steps,
            self.clip_norm,
            self.delta,
            self.mechanism,
        )


TENANT_WIDE = "*"  # the dataset field of a budget change that applies to the whole tenant


class BudgetChange(SQLModel, table=True):
    """An epsilon budget set or changed by an admin; its own hash chain per tenant."""

    __tablename__ = "privacy_budget_change"
    __table_args__ = (UniqueConstraint("tenant_id", "seq"),)
    HASHED: ClassVar[tuple[str, ...]] = (
        "tenant_id", "dataset", "seq", "created_at", "actor", "old_epsilon", "new_epsilon",
        "delta", "reason", "prev_hash",
    )  # fmt: skip

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: str = Field(index=True, max_length=64)
    dataset: str = Field(max_length=63)  # TENANT_WIDE or a dataset name
    seq: int
    created_at: datetime
    actor: str = Field(max_length=100)  # who did it: an admin key prefix, or the operator CLI
    old_epsilon: float | None  # None: the dataset had no budget of its own before
    new_epsilon: float
    delta: float
    reason: str = Field(default="", max_length=500)
    prev_hash: str = Field(max_length=64)
    entry_hash: str = Field(max_length=64)


def entry_digest(row: PrivacyEvent | BudgetChange) -> str:
    """SHA-256 over the canonical JSON of the row's hashed fields (see ``canonical_digest``)."""
    return canonical_digest({name: getattr(row, name) for name in row.HASHED})


def _refuse_change(_mapper: Any, _connection: Any, target: Any) -> None:
    raise AppendOnlyViolation(
        f"The privacy ledger is append-only: refusing to change {type(target).__name__} "
        f"{getattr(target, 'seq', '?')} of tenant {getattr(target, 'tenant_id', '?')}."
    )


for _table in (PrivacyEvent, BudgetChange):
    event.listen(_table, "before_update", _refuse_change)
    event.listen(_table, "before_delete", _refuse_change)


def create_tables(engine: Engine) -> None:
    """Create the ledger's tables where they are missing."""
    SQLModel.metadata.create_all(
        engine,
        tables=[PrivacyEvent.__table__, BudgetChange.__table__],  # type: ignore[attr-defined]
    )


def tenant_events(
    session: Session, tenant_id: str, dataset: str | None = None
) -> list[PrivacyEvent]:
    """A tenant's releases in chain order; only ``dataset``'s when given."""
    query = select(PrivacyEvent).where(PrivacyEvent.tenant_id == tenant_id)
    if dataset is not None:
        query = query.where(PrivacyEvent.dataset == dataset)
    return list(session.exec(query.order_by(col(PrivacyEvent.seq))))


def all_tenant_ids(session: Session) -> list[str]:
    """Every tenant id that has a ledger or budget chain, sorted."""
    ids = set(session.exec(select(PrivacyEvent.tenant_id)).all())
    ids |= set(session.exec(select(BudgetChange.tenant_id)).all())
    return sorted(ids)


def budget_changes(session: Session, tenant_id: str) -> list[BudgetChange]:
    """A tenant's budget changes in chain order."""
    return list(
        session.exec(
            select(BudgetChange)
            .where(BudgetChange.tenant_id == tenant_id)
            .order_by(col(BudgetChange.seq))
        )
    )


def record_event(
    session: Session,
    *,
    tenant_id: str,
    run_id: str,
    round: int,
    params: DPParams,
    spec_sha256: str,
    dataset: str = DEFAULT_DATASET,
) -> PrivacyEvent:
    """Append one charge to the tenant's chain (the caller commits)."""
    check_dataset(dataset)
    last = session.exec(
        select(PrivacyEvent)
        .where(PrivacyEvent.tenant_id == tenant_id)
        .order_by(col(PrivacyEvent.seq).desc())
    ).first()
    ev = PrivacyEvent(
        tenant_id=tenant_id,
        dataset=dataset,
        seq=(last.seq + 1) if last else 1,
        run_id=run_id,
        round=round,
        created_at=utc_seconds(datetime.now(UTC)),
        privacy_unit=PRIVACY_UNIT,
        mechanism=params.mechanism,
        noise_multiplier=params.noise_multiplier,
        sample_rate=params.sample_rate,
        steps=params.steps,
        clip_norm=params.clip_norm,
        delta=params.delta,
        accountant=DEFAULT_ACCOUNTANT,
        accountant_version=accountant_version(),
        fedtext_version=version("fedtext"),
        spec_sha256=spec_sha256,
        prev_hash=last.entry_hash if last else GENESIS,
        entry_hash="",
    )
    ev.entry_hash = entry_digest(ev)
    session.add(ev)
    session.flush()
    return ev


def record_budget_change(
    session: Session,
    *,
    tenant_id: str,
    dataset: str,
    old_epsilon: float | None,
    new_epsilon: float,
    delta: float,
    actor: str,
    reason: str = "",
) -> BudgetChange:
    """Append one budget change to the tenant's budget chain (the caller commits)."""
    if dataset != TENANT_WIDE:
        check_dataset(dataset)
    last = session.exec(
        select(BudgetChange)
        .where(BudgetChange.tenant_id == tenant_id)
        .order_by(col(BudgetChange.seq).desc())
    ).first()
    row = BudgetChange(
        tenant_id=tenant_id,
        dataset=dataset,
        seq=(last.seq + 1) if last else 1,
        created_at=utc_seconds(datetime.now(UTC)),
        actor=actor,
        old_epsilon=old_epsilon,
        new_epsilon=new_epsilon,
        delta=delta,
        reason=reason,
        prev_hash=last.entry_hash if last else GENESIS,
        entry_hash="",
    )
    row.entry_hash = entry_digest(row)
    session.add(row)
    session.flush()
    return row


def spent_epsilon(
    session: Session,
    tenant_id: str,
    delta: float,
    accountant: str = DEFAULT_ACCOUNTANT,
    dataset: str | None = None,
) -> float:
    """Cumulative epsilon of a tenant's recorded releases (of one dataset) at ``delta``."""
    return compose_epsilon(
        [e.params() for e in tenant_events(session, tenant_id, dataset)], delta, accountant
    )


@dataclass(frozen=True)
class ChainProblem:
    tenant_id: str
    seq: int
    reason: str


def verify_chain(events: Sequence[PrivacyEvent | BudgetChange]) -> ChainProblem | None:
    """The first broken link of one tenant's chain (ordered by seq), or None.

    Works for both chains: releases (``PrivacyEvent``) and budget changes.
    """
    prev = GENESIS
    for expected_seq, ev in enumerate(events, start=1):
        if ev.seq != expected_seq:
            return ChainProblem(ev.tenant_id, ev.seq, f"expected entry {expected_seq} here: "
                                "an entry was deleted or reordered")  # fmt: skip
        if ev.prev_hash != prev:
            return ChainProblem(ev.tenant_id, ev.seq, "previous-hash link broken: an earlier "
                                "entry was deleted, reordered or edited")  # fmt: skip
        if entry_digest(ev) != ev.entry_hash:
            return ChainProblem(ev.tenant_id, ev.seq, "entry hash mismatch: the entry was edited")
        prev = ev.entry_hash
    return None
