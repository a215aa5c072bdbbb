"""Append-only privacy ledger: one row per DP release, hash-chained per tenant.

Rows keep the raw mechanism parameters, never only an epsilon, so an auditor can
recompute every figure with an independent accountant. Budget changes are kept in
a second chain per tenant (``BudgetChange``), so raising a budget is as
tamper-evident as spending it. Nothing here updates or deletes a row; the ORM
refuses to (``AppendOnlyViolation``), and an edit made behind its back (raw SQL)
breaks the chain, which ``verify_chain`` reports.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from typing import Any, ClassVar, TypeVar

from sqlalchemy import Index, UniqueConstraint, event, text
from sqlmodel import Field, Session, SQLModel, col, select

from privacy.accounting import DEFAULT_ACCOUNTANT, accountant_version, compose_epsilon
from privacy.canonical import canonical_digest, utc_seconds
from privacy.params import DPParams
from privacy.schemas import DEFAULT_DATASET, PRIVACY_UNIT, LedgerEntryBase

GENESIS = "0" * 64
# "user": every row with one value of the tenant's user column (at most k of them, k in
# the entry's applied_json as max_examples_per_user).
PRIVACY_UNITS = ("example", "user")
# What a release protects: a DP-SGD round ("train"), a tenant's DP fine-tune of the final
# global model after the last round ("personalize": DP-SGD like a round, but not a round),
# or the noised counts of an evaluation ("evaluate", a Gaussian mechanism: q = 1,
# sensitivity 1). Personalizations charged before "personalize" existed are "train"
# entries at round R + 1.
PURPOSES = ("train", "personalize", "evaluate")
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


class PrivacyEvent(SQLModel, LedgerEntryBase, table=True):
    """One DP release (one round of one tenant), as charged at dispatch.

    Its fields are ``LedgerEntryBase``'s (no foreign key on ``tenant_id``: the ledger
    outlives a deleted tenant, auditors keep reading it), plus the row id and signature.
    """

    __tablename__ = "privacy_event"
    # A second writer racing for the same seq fails instead of forking the chain.
    __table_args__ = (
        UniqueConstraint("tenant_id", "seq"),
        Index("ix_privacy_event_tenant_id", "tenant_id"),
        Index("ix_privacy_event_run_id", "run_id"),
    )
    # ``purpose`` and ``applied_json`` came after the first chains were written: they are
    # hashed only when not "train" / "{}", so older entries keep their hashes
    # (``hashed_fields``).
    HASHED: ClassVar[tuple[str, ...]] = (
        "tenant_id", "dataset", "seq", "run_id", "round", "created_at", "privacy_unit",
        "mechanism", "noise_multiplier", "sample_rate", "steps", "clip_norm", "delta",
        "accountant", "accountant_version", "fedtext_version", "spec_sha256", "prev_hash",
    )  # fmt: skip

    id: int | None = Field(default=None, primary_key=True)
    # Ed25519 "<key id>:<signature>" by the platform's signing key over the tenant, seq and
    # entry_hash (tenancy/signing.py); not hashed. None: written before v0006.
    signature: str | None = Field(default=None, max_length=160)

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
    signature: str | None = Field(default=None, max_length=160)  # as PrivacyEvent's


ChainRow = TypeVar("ChainRow", PrivacyEvent, BudgetChange)
# Placeholder time of a row not yet appended: ``_append`` sets the real one under the lock.
_UNSET = datetime.min.replace(tzinfo=UTC)


def hashed_fields(row: PrivacyEvent | BudgetChange) -> tuple[str, ...]:
    """The fields ``entry_hash`` covers: ``HASHED``, plus ``purpose`` when it is not "train"."""
    if isinstance(row, PrivacyEvent):
        extra: tuple[str, ...] = ("purpose",) if row.purpose != "train" else ()
        extra += ("applied_json",) if row.applied_json not in ("", "{}") else ()
        return (*row.HASHED, *extra)
    return row.HASHED


def entry_digest(row: PrivacyEvent | BudgetChange) -> str:
    """SHA-256 over the canonical JSON of the row's hashed fields (see ``canonical_digest``)."""
    return canonical_digest({name: getattr(row, name) for name in hashed_fields(row)})


class LedgerHead(SQLModel, table=True):
    """The head of a tenant's two chains; its row is the lock every append holds.

    Appends to a tenant's chains, budget checks before them and budget reservations all
    run inside ``lock_tenant`` (a row lock here on PostgreSQL, an immediate transaction on
    SQLite), so two runs can never both pass the gate on the same remaining budget.
    Not a record of truth: verification re-hashes the chains and compares signed heads.
    """

    __tablename__ = "privacy_ledger_head"
    tenant_id: str = Field(primary_key=True, max_length=64)
    ledger_seq: int = 0
    ledger_hash: str = Field(default=GENESIS, max_length=64)
    budget_seq: int = 0
    budget_hash: str = Field(default=GENESIS, max_length=64)


def _refuse_change(_mapper: Any, _connection: Any, target: Any) -> None:
    raise AppendOnlyViolation(
        f"The privacy ledger is append-only: refusing to change {type(target).__name__} "
        f"{getattr(target, 'seq', '?')} of tenant {getattr(target, 'tenant_id', '?')}."
    )


for _table in (PrivacyEvent, BudgetChange):
    event.listen(_table, "before_update", _refuse_change)
    event.listen(_table, "before_delete", _refuse_change)


GENESIS_ACTOR = "platform (tenant created)"


@event.listens_for(Session, "before_flush")
def _chain_new_tenant_budgets(session: Session, _context: Any, _instances: Any) -> None:
    """A new tenant's first budget is the first entry of its budget chain.

    The budget chain is the record of the budget in force (the tenant row is a copy),
    so a tenant must never exist with a budget outside it. ``privacy`` imports nothing
    of ours, so it recognises a new tenant row by its table name and budget fields.
    """
    for obj in list(session.new):
        if getattr(type(obj), "__tablename__", None) != "tenant":
            continue
        tenant_id = getattr(obj, "id", None)
        epsilon, delta = getattr(obj, "budget_epsilon", None), getattr(obj, "budget_delta", None)
        if not isinstance(tenant_id, str) or epsilon is None or delta is None:
            continue
        # Inside a flush nothing can be locked or read back: a new tenant has no chain yet,
        # so its first change is linked to the genesis directly.
        row = BudgetChange(
            tenant_id=tenant_id,
            dataset=TENANT_WIDE,
            seq=0,
            created_at=utc_seconds(datetime.now(UTC)),
            actor=GENESIS_ACTOR,
            old_epsilon=None,
            new_epsilon=float(epsilon),
            delta=float(delta),
            reason="initial budget",
            prev_hash="",
            entry_hash="",
        )
        _link(row, None)
        session.add(row)
        session.add(LedgerHead(tenant_id=tenant_id, budget_seq=1, budget_hash=row.entry_hash))


def lock_tenant(session: Session, tenant_id: str) -> None:
    """Hold the tenant's ledger head until the session's transaction ends.

    PostgreSQL: the head row is created if missing, then locked with ``FOR UPDATE``.
    SQLite: the transaction is made ``IMMEDIATE`` (the database's write lock), so call
    this before the session writes anything; reads before it are fine (Python's sqlite3
    does not open a transaction for them). Every budget check that must stay true until
    its append (a charge, a reservation) runs under this lock.
    """
    conn = session.connection()
    if conn.dialect.name == "sqlite":
        dbapi = conn.connection.dbapi_connection
        if dbapi is not None and not dbapi.in_transaction:  # type: ignore[attr-defined]
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        conn.execute(
            text("INSERT OR IGNORE INTO privacy_ledger_head (tenant_id, ledger_seq, ledger_hash, "
                 "budget_seq, budget_hash) VALUES (:t, 0, :g, 0, :g)"),
            {"t": tenant_id, "g": GENESIS},
        )  # fmt: skip
        return
    conn.execute(
        text("INSERT INTO privacy_ledger_head (tenant_id, ledger_seq, ledger_hash, budget_seq, "
             "budget_hash) VALUES (:t, 0, :g, 0, :g) ON CONFLICT (tenant_id) DO NOTHING"),
        {"t": tenant_id, "g": GENESIS},
    )  # fmt: skip
    conn.execute(
        text("SELECT tenant_id FROM privacy_ledger_head WHERE tenant_id = :t FOR UPDATE"),
        {"t": tenant_id},
    )


def _link(row: PrivacyEvent | BudgetChange, last: PrivacyEvent | BudgetChange | None) -> None:
    """Place ``row`` after ``last`` (None: first) in its chain: seq, prev_hash, entry_hash."""
    row.seq = (last.seq + 1) if last else 1
    row.prev_hash = last.entry_hash if last else GENESIS
    row.entry_hash = entry_digest(row)


def _append(session: Session, row: ChainRow) -> ChainRow:
    """Append ``row`` to its chain (releases or budget changes) of its tenant; the one way
    both chains grow (the caller commits).

    Takes the tenant's lock (``lock_tenant``) first, so the sequence number read here cannot
    be read by a concurrent writer before this append commits; the row's time is taken
    under the lock, so time order is chain order.
    """
    lock_tenant(session, row.tenant_id)
    table = type(row)
    last = session.exec(
        select(table).where(table.tenant_id == row.tenant_id).order_by(col(table.seq).desc())
    ).first()
    row.created_at = utc_seconds(datetime.now(UTC))
    _link(row, last)
    session.add(row)
    session.flush()
    head = session.get(LedgerHead, row.tenant_id, populate_existing=True)
    assert head is not None
    if isinstance(row, PrivacyEvent):
        head.ledger_seq, head.ledger_hash = row.seq, row.entry_hash
    else:
        head.budget_seq, head.budget_hash = row.seq, row.entry_hash
    session.add(head)
    return row


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
    purpose: str = "train",
    applied: Mapping[str, Any] | None = None,
    privacy_unit: str = PRIVACY_UNIT,
) -> PrivacyEvent:
    """Append one charge to the tenant's chain (the caller commits).

    ``applied``: the run settings that applied to the tenant, kept (hashed) on the entry.
    """
    check_dataset(dataset)
    if privacy_unit not in PRIVACY_UNITS:
        raise ValueError(f"Unknown privacy unit {privacy_unit!r}; known: {list(PRIVACY_UNITS)}.")
    if purpose not in PURPOSES:
        raise ValueError(f"Unknown release purpose {purpose!r}; known: {list(PURPOSES)}.")
    return _append(
        session,
        PrivacyEvent(
            tenant_id=tenant_id,
            dataset=dataset,
            seq=0,
            run_id=run_id,
            round=round,
            created_at=_UNSET,
            privacy_unit=privacy_unit,
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
            prev_hash="",
            entry_hash="",
            purpose=purpose,
            applied_json=json.dumps(dict(applied or {}), sort_keys=True, separators=(",", ":")),
        ),
    )


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
    return _append(
        session,
        BudgetChange(
            tenant_id=tenant_id,
            dataset=dataset,
            seq=0,
            created_at=_UNSET,
            actor=actor,
            old_epsilon=old_epsilon,
            new_epsilon=new_epsilon,
            delta=delta,
            reason=reason,
            prev_hash="",
            entry_hash="",
        ),
    )


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
