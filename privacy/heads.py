"""Signed chain heads: what an auditor keeps so that truncation or a rewrite shows.

A hash chain alone shows an edited or deleted entry in the middle, but not a deleted
tail, a tenant's whole chain deleted, or a chain rewritten and re-hashed by someone who
can write the database. A *signed head* closes that gap: the length and last hash of
both of a tenant's chains (releases and budget changes) and the budget in force,
signed with Ed25519 under the platform's signing key, which the database does not hold
and which a KEK rotation does not change (tenancy/signing.py keeps its history). An
auditor keeps the heads exported with each report or ledger export; ``verify_head``
then checks that the database still holds that history as a prefix and the same budget
settings.

This is the only module of ``privacy`` that uses ``cryptography``'s hazmat layer
(``privacy`` imports nothing of ours, so it cannot use ``tenancy.crypto``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlmodel import Field, Session, SQLModel, col, select

from privacy.ledger import (
    GENESIS,
    TENANT_WIDE,
    BudgetChange,
    PrivacyEvent,
    budget_changes,
    tenant_events,
    verify_chain,
)
from privacy.schemas import Head, SignedHeadPublic

HEADS_FILE_FORMAT = "fedtext-signed-heads/1"


class HeadError(ValueError):
    """A head file that cannot be read; the message says why."""


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


def key_id(public_key: bytes) -> str:
    return hashlib.sha256(public_key).hexdigest()[:32]


@dataclass(frozen=True)
class HeadSigner:
    """Ed25519 from the 32-byte seed of the platform's signing key (never in the database)."""

    seed: bytes

    def __post_init__(self) -> None:
        if len(self.seed) != 32:
            raise ValueError("A head signing seed should be 32 bytes.")

    @property
    def public_key(self) -> bytes:
        return (
            Ed25519PrivateKey.from_private_bytes(self.seed)
            .public_key()
            .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        )

    def sign(self, head: Head) -> SignedHeadPublic:
        signature = Ed25519PrivateKey.from_private_bytes(self.seed).sign(head.canonical())
        pub = self.public_key
        return SignedHeadPublic(
            head=head,
            key_id=key_id(pub),
            public_key=base64.b64encode(pub).decode(),
            signature=base64.b64encode(signature).decode(),
        )


class PlatformKeys(Protocol):
    """What signing needs of the platform's keyring (``tenancy.keyring.Keyring``)."""

    def signing_seed(self) -> bytes: ...

    def signing_key_ids(self) -> list[str]: ...

    def chain_signature_problems(
        self, table: str, rows: Sequence[Any]
    ) -> list[tuple[Any, str]]: ...


def authorship_problems(
    keys: PlatformKeys, events: Sequence[PrivacyEvent], changes: Sequence[BudgetChange]
) -> list[str]:
    """Each ledger entry and budget change of one tenant whose signature is not accepted
    (unsigned at the end of its chain, badly signed, or by a key outside the history)."""
    found = []
    for ev, status in keys.chain_signature_problems("privacy_event", events):
        found.append(f"ledger entry {ev.seq} (run {ev.run_id}, round {ev.round}): {status}")
    for ch, status in keys.chain_signature_problems("privacy_budget_change", changes):
        found.append(f"budget change {ch.seq} (to {ch.new_epsilon:g} by {ch.actor!r}): {status}")
    return found


def platform_signer(keys: PlatformKeys) -> HeadSigner:
    """The signer of the platform's current signing key (kept by the key provider, apart
    from the KEK: a KEK rotation does not change it; see tenancy/signing.py)."""
    return HeadSigner(keys.signing_seed())


def platform_key_ids(keys: PlatformKeys, versions: Iterable[int] = ()) -> list[str]:
    """The key ids of the platform's signing history: every signing-key version and the
    KEK-derived keys that signed heads before v0006 (``versions``: unused, kept for
    callers that pass the KEK versions)."""
    del versions
    return keys.signing_key_ids()


def signature_valid(signed: SignedHeadPublic) -> bool:
    """Whether ``signed.signature`` is the Ed25519 signature of the head under its key."""
    try:
        pub = base64.b64decode(signed.public_key, validate=True)
        sig = base64.b64decode(signed.signature, validate=True)
        if key_id(pub) != signed.key_id:
            return False
        Ed25519PublicKey.from_public_bytes(pub).verify(sig, signed.head.canonical())
    except (InvalidSignature, ValueError, binascii.Error):
        return False
    return True


def budget_in_force(changes: Sequence[BudgetChange]) -> tuple[float | None, dict[str, float]]:
    """The tenant-wide epsilon (None if never recorded) and each dataset's own, from the chain."""
    tenant: float | None = None
    datasets: dict[str, float] = {}
    for change in changes:
        if change.dataset == TENANT_WIDE:
            tenant = change.new_epsilon
        else:
            datasets[change.dataset] = change.new_epsilon
    return tenant, datasets


def current_head(
    session: Session, *, tenant_id: str, budget_epsilon: float, budget_delta: float
) -> Head:
    """The head of the tenant's chains now, with the budget the tenant row holds."""
    events = tenant_events(session, tenant_id)
    changes = budget_changes(session, tenant_id)
    return Head(
        tenant_id=tenant_id,
        ledger_seq=len(events),
        ledger_hash=events[-1].entry_hash if events else GENESIS,
        budget_seq=len(changes),
        budget_hash=changes[-1].entry_hash if changes else GENESIS,
        budget_epsilon=budget_epsilon,
        budget_delta=budget_delta,
        dataset_budgets=budget_in_force(changes)[1],
        signed_at=datetime.now(UTC).replace(microsecond=0).isoformat(),
    )


def sign_and_store(
    session: Session,
    signer: HeadSigner,
    *,
    tenant_id: str,
    budget_epsilon: float,
    budget_delta: float,
) -> SignedHeadPublic:
    """Sign the tenant's head now and keep a copy (the caller commits)."""
    signed = signer.sign(
        current_head(
            session, tenant_id=tenant_id, budget_epsilon=budget_epsilon, budget_delta=budget_delta
        )
    )
    session.add(
        SignedHead(
            tenant_id=tenant_id,
            created_at=datetime.now(UTC).replace(microsecond=0),
            body=signed.model_dump_json(),
        )
    )
    session.flush()
    return signed


def last_signed_head(session: Session, tenant_id: str) -> SignedHeadPublic | None:
    row = session.exec(
        select(SignedHead)
        .where(SignedHead.tenant_id == tenant_id)
        .order_by(col(SignedHead.id).desc())
    ).first()
    return None if row is None else SignedHeadPublic.model_validate_json(row.body)


def verify_head(
    signed: SignedHeadPublic,
    *,
    events: Sequence[PrivacyEvent],
    changes: Sequence[BudgetChange],
    budget_epsilon: float | None,
    budget_delta: float | None,
    trusted_keys: Iterable[str] | None = None,
) -> list[str]:
    """What is wrong with the database's chains against a head kept earlier ([] if none).

    Parameters
    ----------
    signed
        A head the auditor kept (from a report or a ledger export).
    events, changes
        The tenant's releases and budget changes as the database holds them now.
    budget_epsilon, budget_delta
        The budget in force on the tenant row now (None: the tenant row is gone).
    trusted_keys
        Key ids the head may be signed with (the platform's); None skips that check.

    Detects: a bad signature; entries removed after the head (truncation, or every entry
    of the tenant deleted); entries up to the head edited and re-hashed; budget changes
    removed; a budget in force that differs from the budget chain's last change; and,
    when nothing was appended since, a budget that differs from the signed one.
    """
    head = signed.head
    problems: list[str] = []
    if not signature_valid(signed):
        problems.append("the head's signature is not valid: the head file was altered")
    elif trusted_keys is not None and signed.key_id not in set(trusted_keys):
        problems.append(f"the head is signed by key {signed.key_id}, not one of this platform's")
    for name, rows, seq, expected in (
        ("ledger", events, head.ledger_seq, head.ledger_hash),
        ("budget chain", changes, head.budget_seq, head.budget_hash),
    ):
        broken = verify_chain(rows)
        if broken is not None:
            problems.append(f"{name} entry {broken.seq}: {broken.reason}")
        if len(rows) < seq:
            problems.append(
                f"{name} has {len(rows)} entries, the signed head {seq}: entries were deleted"
            )
        elif seq and rows[seq - 1].entry_hash != expected:
            problems.append(
                f"{name} entry {seq} differs from the signed head: the chain was rewritten"
            )
    tenant_wide, datasets = budget_in_force(changes)
    if budget_epsilon is None:
        problems.append("the tenant row is gone while its signed head is kept")
    else:
        if tenant_wide is not None and not math.isclose(tenant_wide, budget_epsilon):
            problems.append(
                f"budget in force {budget_epsilon:g} differs from the budget chain's last "
                f"change {tenant_wide:g}: the budget was edited outside the record"
            )
        unchanged = len(changes) == head.budget_seq
        if unchanged and not math.isclose(budget_epsilon, head.budget_epsilon):
            problems.append(
                f"budget in force {budget_epsilon:g} differs from the signed "
                f"{head.budget_epsilon:g} with no budget change recorded since"
            )
        if budget_delta is not None and not math.isclose(budget_delta, head.budget_delta):
            problems.append(f"delta {budget_delta:g} differs from the signed {head.budget_delta:g}")
        if unchanged and datasets != head.dataset_budgets:
            problems.append("dataset budgets differ from the signed head")
    return problems


def heads_file(heads: Sequence[SignedHeadPublic]) -> str:
    """The JSON an auditor keeps: every exported tenant's signed head."""
    return json.dumps(
        {"format": HEADS_FILE_FORMAT, "heads": [h.model_dump() for h in heads]}, indent=2
    )


def read_heads(text: str) -> list[SignedHeadPublic]:
    """Heads from a heads file, a single signed head, or a JSON audit report."""
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise HeadError(f"The head file is not JSON: {exc.msg}.") from None
    if isinstance(data, dict) and data.get("format") == HEADS_FILE_FORMAT:
        items = data.get("heads", [])
    elif isinstance(data, dict) and "signed_head" in data:
        items = [data["signed_head"]]
    elif isinstance(data, dict) and "head" in data:
        items = [data]
    else:
        raise HeadError("The file holds no signed head (a heads file, a head or a report).")
    try:
        return [SignedHeadPublic.model_validate(item) for item in items]
    except ValueError as exc:
        raise HeadError(f"The head file is malformed: {exc}") from None
