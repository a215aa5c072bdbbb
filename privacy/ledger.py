"""Append-only privacy ledger: one row per DP release, hash-chained per tenant.

Rows keep the raw mechanism parameters, never only an epsilon, so an auditor can
recompute every figure with an independent accountant.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version

from sqlalchemy import Engine
from sqlmodel import Field, Session, SQLModel, col, select

from privacy.accounting import DEFAULT_ACCOUNTANT, accountant_version, compose_epsilon
from privacy.params import DPParams

GENESIS = "0" * 64


class PrivacyEvent(SQLModel, table=True):
    __tablename__ = "privacy_event"
    id: int | None = Field(default=None, primary_key=True)
    # No foreign key: the ledger outlives a deleted tenant (auditors keep reading it).
    tenant_id: str = Field(index=True, max_length=64)
    seq: int  # position in this tenant's chain, from 1
    run_id: str = Field(index=True, max_length=64)
    round: int
    created_at: datetime
    privacy_unit: str = "example"
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


_HASHED = (
    "tenant_id", "seq", "run_id", "round", "created_at", "privacy_unit", "mechanism",
    "noise_multiplier", "sample_rate", "steps", "clip_norm", "delta", "accountant",
    "accountant_version", "fedtext_version", "spec_sha256", "prev_hash",
)  # fmt: skip


def entry_digest(ev: PrivacyEvent) -> str:
    """SHA-256 over the canonical JSON of the entry's fields (floats as repr)."""
    data = {}
    for name in _HASHED:
        value = getattr(ev, name)
        if isinstance(value, datetime):
            value = value.astimezone(UTC).isoformat()
        elif isinstance(value, float):
            value = repr(value)
        data[name] = value
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def create_tables(engine: Engine) -> None:
    SQLModel.metadata.create_all(engine, tables=[PrivacyEvent.__table__])  # type: ignore[attr-defined]


def tenant_events(session: Session, tenant_id: str) -> list[PrivacyEvent]:
    return list(
        session.exec(
            select(PrivacyEvent)
            .where(PrivacyEvent.tenant_id == tenant_id)
            .order_by(col(PrivacyEvent.seq))
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
) -> PrivacyEvent:
    """Append one charge to the tenant's chain (the caller commits)."""
    last = session.exec(
        select(PrivacyEvent)
        .where(PrivacyEvent.tenant_id == tenant_id)
        .order_by(col(PrivacyEvent.seq).desc())
    ).first()
    ev = PrivacyEvent(
        tenant_id=tenant_id,
        seq=(last.seq + 1) if last else 1,
        run_id=run_id,
        round=round,
        created_at=datetime.now(UTC).replace(microsecond=0),  # stable across DBs
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


def spent_epsilon(
    session: Session, tenant_id: str, delta: float, accountant: str = DEFAULT_ACCOUNTANT
) -> float:
    """Cumulative epsilon of all of a tenant's recorded releases at ``delta``."""
    return compose_epsilon(
        [e.params() for e in tenant_events(session, tenant_id)], delta, accountant
    )


@dataclass(frozen=True)
class ChainProblem:
    tenant_id: str
    seq: int
    reason: str


def verify_chain(events: list[PrivacyEvent]) -> ChainProblem | None:
    """The first broken link of one tenant's chain (ordered by seq), or None."""
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
