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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from typing import Any, ClassVar

from sqlalchemy import Engine, UniqueConstraint, event, text
from sqlmodel import Field, Session, SQLModel, col, select

from privacy.accounting import DEFAULT_ACCOUNTANT, accountant_version, compose_epsilon
from privacy.params import DPParams

GENESIS = "0" * 64
DEFAULT_DATASET = "default"
PRIVACY_UNIT = "example"  # one training example of one tenant's dataset
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
    # Added after the first chains were written: hashed only when it is not "train", so
    # entries written before it existed keep their hashes (see ``hashed_fields``).
    purpose: str = Field(default="train", max_length=16)
    # Ed25519 "<key id>:<signature>" by the platform's signing key over the tenant, seq and
    # entry_hash (tenancy/signing.py); not hashed. None: written before v0006.
    signature: str | None = Field(default=None, max_length=160)
    # The run settings that applied to this tenant (canonical JSON: secure_mode, the
    # effective deploy policy, model family, epsilon target, the run's owner, the dataset
    # and who declared it; docs/AUDIT.md). Hashed when not "{}", like ``purpose``.
    applied_json: str = Field(default="{}")

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
        row = BudgetChange(
            tenant_id=tenant_id,
            dataset=TENANT_WIDE,
            seq=1,
            created_at=utc_seconds(datetime.now(UTC)),
            actor=GENESIS_ACTOR,
            old_epsilon=None,
            new_epsilon=float(epsilon),
            delta=float(delta),
            reason="initial budget",
            prev_hash=GENESIS,
            entry_hash="",
        )
        row.entry_hash = entry_digest(row)
        session.add(row)
        session.add(LedgerHead(tenant_id=tenant_id, budget_seq=1, budget_hash=row.entry_hash))


class SignedHead(SQLModel, table=True):
    """Every head the platform signed (at exports, reports and run ends), append-only.

    The report compares the database with the newest of these; someone who can write
    the database can delete them too, which is why auditors keep the exported copies.
    """

    __tablename__ = "privacy_signed_head"
    id: int | None = Field(default=None, primary_key=True)
    tenant_id: str = Field(index=True, max_length=64)
    created_at: datetime
    body: str  # the SignedHeadPublic as JSON


def create_tables(engine: Engine) -> None:
    """Create the ledger's tables where they are missing."""
    SQLModel.metadata.create_all(
        engine,
        tables=[t.__table__ for t in ledger_tables()],  # type: ignore[attr-defined]
    )


def ledger_tables() -> list[type[SQLModel]]:
    """Every table of ``privacy``: the chains, their heads, signed heads, reservations."""
    from privacy.reservations import BudgetReservation  # defined beside its logic

    return [PrivacyEvent, BudgetChange, LedgerHead, SignedHead, BudgetReservation]


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


def _move_head(session: Session, row: PrivacyEvent | BudgetChange) -> None:
    lock_tenant(session, row.tenant_id)
    head = session.get(LedgerHead, row.tenant_id, populate_existing=True)
    assert head is not None
    if isinstance(row, PrivacyEvent):
        head.ledger_seq, head.ledger_hash = row.seq, row.entry_hash
    else:
        head.budget_seq, head.budget_hash = row.seq, row.entry_hash
    session.add(head)


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

    Takes the tenant's lock (``lock_tenant``) first, so the sequence number read here
    cannot be read by a concurrent writer before this append commits.
    """
    check_dataset(dataset)
    if privacy_unit not in PRIVACY_UNITS:
        raise ValueError(f"Unknown privacy unit {privacy_unit!r}; known: {list(PRIVACY_UNITS)}.")
    if purpose not in PURPOSES:
        raise ValueError(f"Unknown release purpose {purpose!r}; known: {list(PURPOSES)}.")
    lock_tenant(session, tenant_id)
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
        prev_hash=last.entry_hash if last else GENESIS,
        entry_hash="",
        purpose=purpose,
        applied_json=json.dumps(dict(applied or {}), sort_keys=True, separators=(",", ":")),
    )
    ev.entry_hash = entry_digest(ev)
    session.add(ev)
    session.flush()
    _move_head(session, ev)
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
    lock_tenant(session, tenant_id)
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
    _move_head(session, row)
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
