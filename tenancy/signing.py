"""Signed authorship: ledger entries, budget changes, API key rows, node key enrollments,
consents between tenants, tenant policies and model versions (their deployment state
included) are signed (Ed25519).

The hash chains prove order; they do not prove who wrote an entry: someone who can write
the database can append a correctly hashed budget raise, rewrite and re-hash recent
charges, insert an admin key row, or enroll a node key for another tenant. So each such
row carries ``signature``: an Ed25519 signature, by the platform's signing key, over what
binds its content and position (a ledger row's tenant, sequence number and entry hash,
which chains over every hashed field and the previous entry; a key or enrollment row's
digest over all its fields, revocation included).

The signing key is not in the database and is independent of the key-encryption key: the
key provider keeps it (file: ``signing.key`` beside the KEK file, 0600; PKCS#11: an HMAC
key in the token from which the seed is derived inside it; env: derived from the one
KEK, which that provider never rotates). Rotating the KEK never changes it; rotating the
signing key itself (``fedtext keys rotate-signing``) adds a version whose public key is
endorsed by the previous one, so an auditor who pinned an earlier key follows the chain.
The public history (``SigningHistory``) is what ``fedtext audit keys`` and
``GET /v1/privacy/signing-keys`` give out; ``fedtext audit verify`` accepts a row only if
its signature verifies under a key of that history (or of the keys the auditor pinned,
``--keys FILE``).

Rows are signed where they are written, whoever writes them: a mapper hook signs each new
row of ``SIGNED_TABLES`` (and a row of ``MUTABLE_TABLES`` again when it changes, e.g. a key
revoked, a version deployed; never over a row that did not verify before the change) on
any engine a ``tenancy.platform.Platform`` was made with (``attach``). What each signature
binds is ``tenancy.signed_rows``'.
``privacy`` and ``tenancy.nodes`` are recognised here by table name (``privacy`` imports
nothing of ours), as the ledger recognises a new tenant row. What an auditor is told
about a row is ``tenancy.signing_audit``'s.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import threading
from collections.abc import Iterable, Mapping
from typing import Any, Literal, Protocol
from weakref import WeakKeyDictionary

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel
from sqlalchemy import Engine, event
from sqlalchemy.orm import Mapper

from tenancy.errors import KeyProviderError
from tenancy.signed_rows import (  # what a signature binds (re-exported for callers)
    GOVERNANCE_TABLES as GOVERNANCE_TABLES,
)
from tenancy.signed_rows import (
    KEY_TABLE,
    LEDGER_TABLES,
    MUTABLE_TABLES,
    NODE_TABLE,
    PARTNER_TABLE,
    POLICY_TABLE,
    SIGNED_TABLES,
    VERSION_TABLE,
    row_message,
)

log = logging.getLogger(__name__)

ENDORSEMENT_FORMAT = "fedtext-signing-key-endorsement/1"
HISTORY_FORMAT = "fedtext-signing-keys/1"
# What a signature check finds.
Status = Literal["ok", "unsigned", "unknown-key", "bad"]


class SigningKeySource(Protocol):
    """What signing needs of a key provider (``tenancy.key_providers.KeyProvider`` is one;
    named here so that the providers, which derive public keys with this module, are not
    imported back)."""

    def signing_versions(self) -> list[int]: ...

    def signing_seed(self, version: int) -> bytes: ...

    def add_signing_version(self) -> int: ...

    def legacy_head_public_keys(self) -> list[bytes]: ...


def public_key_of(seed: bytes) -> bytes:
    """The raw 32-byte Ed25519 public key of a 32-byte seed."""
    return (
        Ed25519PrivateKey.from_private_bytes(seed)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


def key_id(public_key: bytes) -> str:
    """SHA-256 hex (first 32) of the raw public key (as ``privacy.heads.key_id``)."""
    return hashlib.sha256(public_key).hexdigest()[:32]


def sign(seed: bytes, message: bytes) -> str:
    """``<key id>:<base64 signature>``: what a row's ``signature`` column holds."""
    sig = Ed25519PrivateKey.from_private_bytes(seed).sign(message)
    return f"{key_id(public_key_of(seed))}:{base64.b64encode(sig).decode()}"


def check(signature: str | None, message: bytes, trusted: Mapping[str, bytes]) -> Status:
    """Whether ``signature`` signs ``message`` under one of ``trusted`` (key id -> key)."""
    if not signature:
        return "unsigned"
    kid, _, encoded = signature.partition(":")
    public = trusted.get(kid)
    if public is None:
        return "unknown-key"
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(
            base64.b64decode(encoded, validate=True), message
        )
    except (InvalidSignature, ValueError, binascii.Error):
        return "bad"
    return "ok"


# ----------------------------------------------------------------- the public history


class SigningKeyRecord(BaseModel):
    """One public key of the platform's history.

    kind "signing": signing-key ``version`` (1 is the root; each later one is endorsed by
    the one before). kind "legacy-head": a key derived from a KEK version that signed
    chain heads before signing keys existed (v0006), endorsed by version 1.
    """

    kind: Literal["signing", "legacy-head"]
    version: int
    key_id: str
    public_key: str  # raw 32 bytes, base64
    endorsed_by: str | None = None  # key id of the endorsing key
    endorsement: str | None = None  # base64 Ed25519 signature of ``endorsement_message``

    def raw(self) -> bytes:
        return base64.b64decode(self.public_key)

    def endorsement_message(self) -> bytes:
        return f"{ENDORSEMENT_FORMAT}\n{self.kind}\n{self.version}\n{self.public_key}".encode()


class SigningHistory(BaseModel):
    """Every public key the platform signed with, each endorsed by an earlier one."""

    format: str = HISTORY_FORMAT
    keys: list[SigningKeyRecord]

    def current(self) -> SigningKeyRecord:
        return max((k for k in self.keys if k.kind == "signing"), key=lambda k: k.version)

    def trusted(self, pinned: Iterable[str] | None = None) -> dict[str, bytes]:
        """Key id -> public key of every key trusted from ``pinned`` (default: version 1).

        A key is trusted if it is a root, or if its endorsement verifies under a key
        already trusted; a record whose key id does not match its key is never trusted.
        """
        valid = [k for k in self.keys if _record_consistent(k)]
        if pinned is None:
            roots = {k.key_id for k in valid if k.kind == "signing" and k.version == 1}
        else:
            roots = set(pinned)
        trusted = {k.key_id: k.raw() for k in valid if k.key_id in roots}
        grew = True
        while grew:
            grew = False
            for record in valid:
                if record.key_id in trusted or record.endorsed_by not in trusted:
                    continue
                status = check(
                    f"{record.endorsed_by}:{record.endorsement}",
                    record.endorsement_message(),
                    trusted,
                )
                if status == "ok":
                    trusted[record.key_id] = record.raw()
                    grew = True
        return trusted


def _record_consistent(record: SigningKeyRecord) -> bool:
    try:
        raw = base64.b64decode(record.public_key, validate=True)
    except (binascii.Error, ValueError):
        return False
    return len(raw) == 32 and key_id(raw) == record.key_id


def read_history(text: str) -> SigningHistory:
    """A history as ``fedtext audit keys`` writes it; ValueError saying what is wrong."""
    try:
        history = SigningHistory.model_validate_json(text)
    except ValueError as exc:
        raise ValueError(f"Not a signing-key history ({HISTORY_FORMAT}): {exc}") from None
    if history.format != HISTORY_FORMAT:
        raise ValueError(f"Not a signing-key history: format {history.format!r}.")
    return history


def _endorse(seed: bytes, record: SigningKeyRecord) -> SigningKeyRecord:
    signature = sign(seed, record.endorsement_message())
    kid, _, sig = signature.partition(":")
    return record.model_copy(update={"endorsed_by": kid, "endorsement": sig})


class SigningKeys:
    """The platform's signing keys, through its key provider (seeds cached per process).

    A process keeps signing with the version that was current when it first signed; rows
    it signs after a ``rotate-signing`` elsewhere still verify (the old key stays in the
    history), and it takes the new version when restarted.
    """

    def __init__(self, provider: SigningKeySource) -> None:
        self.provider = provider
        self._lock = threading.Lock()
        self._current: bytes | None = None
        self._history: SigningHistory | None = None
        self._trusted: tuple[SigningHistory, dict[str, bytes]] | None = None

    def seed(self) -> bytes:
        """The current signing key's seed (read once)."""
        with self._lock:
            if self._current is None:
                versions = self.provider.signing_versions()
                self._current = self.provider.signing_seed(versions[-1])
            return self._current

    def sign(self, message: bytes) -> str:
        return sign(self.seed(), message)

    def history(self, refresh: bool = False) -> SigningHistory:
        """Every public key, endorsed (computed from the provider's keys; cached)."""
        with self._lock:
            if self._history is not None and not refresh:
                return self._history
        records: list[SigningKeyRecord] = []
        first: bytes | None = None
        previous: bytes | None = None
        for version in self.provider.signing_versions():
            seed = self.provider.signing_seed(version)
            pub = public_key_of(seed)
            record = SigningKeyRecord(
                kind="signing",
                version=version,
                key_id=key_id(pub),
                public_key=base64.b64encode(pub).decode(),
            )
            records.append(record if previous is None else _endorse(previous, record))
            first = first or seed
            previous = seed
        assert first is not None  # every provider has version 1 (made on first use)
        for number, pub in enumerate(self.provider.legacy_head_public_keys(), start=1):
            records.append(
                _endorse(
                    first,
                    SigningKeyRecord(
                        kind="legacy-head",
                        version=number,
                        key_id=key_id(pub),
                        public_key=base64.b64encode(pub).decode(),
                    ),
                )
            )
        history = SigningHistory(keys=records)
        with self._lock:
            self._history = history
        return history

    def trusted(self, pinned: Iterable[str] | None = None) -> dict[str, bytes]:
        """``SigningHistory.trusted`` of the current history (from version 1: computed once
        per history, as it verifies every endorsement; do not change the answer)."""
        history = self.history()
        if pinned is not None:
            return history.trusted(pinned)
        cached = self._trusted
        if cached is not None and cached[0] is history:
            return cached[1]
        trusted = history.trusted()
        self._trusted = (history, trusted)
        return trusted

    def check_row(self, table: str, row: Any, pinned: Iterable[str] | None = None) -> Status:
        """The signature status of one row against the history (read again once when the
        row names a key this process has not seen: another process rotated)."""
        message = row_message(table, row)
        status = check(row.signature, message, self.trusted(pinned))
        if status == "unknown-key":
            self.history(refresh=True)
            status = check(row.signature, message, self.trusted(pinned))
        return status

    def rotate(self) -> SigningKeyRecord:
        """A new signing-key version, endorsed by the current one; returns its record."""
        self.provider.add_signing_version()
        with self._lock:
            self._current = None
        return self.history(refresh=True).current()


# ----------------------------------------------------------------- signing where rows are written

_ATTACHED: WeakKeyDictionary[Engine, SigningKeys] = WeakKeyDictionary()


def attach(engine: Engine, keys: SigningKeys) -> None:
    """Sign every row of ``SIGNED_TABLES`` written through ``engine`` with ``keys``."""
    _ATTACHED[engine] = keys


def keys_for(engine: Engine | None) -> SigningKeys | None:
    """The signing keys attached to ``engine`` (None: not a platform's engine)."""
    return None if engine is None else _ATTACHED.get(engine)


def _sign_row(table: str, connection: Any, target: Any) -> None:
    keys = keys_for(connection.engine)
    if keys is None:
        return
    if table in LEDGER_TABLES and not getattr(target, "entry_hash", ""):
        return  # not hashed yet: nothing that could verify would be signed
    target.signature = keys.sign(row_message(table, target))


@event.listens_for(Mapper, "before_insert")
def _sign_new_row(_mapper: Any, connection: Any, target: Any) -> None:
    table = getattr(type(target), "__tablename__", None)
    if table in SIGNED_TABLES:
        _sign_row(str(table), connection, target)


@event.listens_for(Mapper, "before_update")
def _sign_changed_row(_mapper: Any, connection: Any, target: Any) -> None:
    # Ledger rows never change (privacy refuses it); a key row changes when revoked, a
    # node enrollment when revoked or enrolled again, a policy when its admin sets it, a
    # model version when deployed, rolled back, re-encrypted or its serving mode changes.
    table = getattr(type(target), "__tablename__", None)
    if table not in MUTABLE_TABLES:
        return
    keys = keys_for(connection.engine)
    if keys is None:
        return
    # Never sign over a row that did not verify before this change: what a writer of the
    # database put there would be laundered by any later change (a rotation re-encrypting
    # it, a revocation). A write function that resets such a row on purpose says so.
    if not target.__dict__.pop(REPAIRED, False):
        before = _before_change(target)
        if keys.check_row(str(table), before) != "ok":
            log.warning(
                "a %s row that does not verify was changed; left unsigned (signature %s)",
                table,
                "absent" if not before.signature else "invalid",
                extra={"fields": {"table": table, "tenant": target.tenant_id}},
            )
            return
    _sign_row(str(table), connection, target)


REPAIRED = "_fedtext_signing_repaired"


def mark_repaired(row: Any) -> None:
    """Let the next update of ``row`` be signed although its stored version did not verify:
    for a write function that has replaced everything a writer could have forged."""
    row.__dict__[REPAIRED] = True


def _before_change(target: Any) -> Any:
    """The row as stored before the pending change (column values from attribute history)."""
    from types import SimpleNamespace

    from sqlalchemy import inspect

    state = inspect(target)
    values = {}
    for attr in state.mapper.column_attrs:
        history = state.attrs[attr.key].history
        if history.deleted:
            values[attr.key] = history.deleted[0]
        else:
            values[attr.key] = getattr(target, attr.key)
    return SimpleNamespace(**values)


def row_trusted(
    engine: Engine | None, table: str, row: Any, what: str, *, strict_keys: bool = False
) -> bool:
    """Whether a signed row (not a ledger row) may be believed: its signature
    verifies under the platform's history (True where no platform's keys are attached:
    nothing to check against). A refusal is logged, naming ``what`` the row is."""
    keys = keys_for(engine)
    if keys is None:
        return True
    try:
        status = keys.check_row(table, row)
    except KeyProviderError:
        if strict_keys:  # the caller says what the missing key means (not a forged row)
            raise
        log.exception("cannot read the platform's signing keys to check %s", what)
        return False
    if status != "ok":
        log.warning(
            "%s refused: its signature is %s (written without the platform's signing key; "
            "if it predates its table's signatures, run `fedtext audit sign-existing`)",
            what,
            status,
            extra={"fields": {"table": table, "tenant": row.tenant_id}},
        )
        return False
    return True


def key_row_trusted(engine: Engine | None, row: Any) -> bool:
    """Whether an API key row may authenticate (``row_trusted``)."""
    return row_trusted(engine, KEY_TABLE, row, f"API key row {row.prefix}")


def node_row_trusted(engine: Engine | None, row: Any) -> bool:
    """Whether a node key enrollment binds its key to its tenant (``row_trusted``)."""
    return row_trusted(engine, NODE_TABLE, row, f"node key enrollment {row.fingerprint[:16]}")


def partner_row_trusted(engine: Engine | None, row: Any) -> bool:
    """Whether a consent row is consent (``row_trusted``)."""
    what = f"consent of {row.tenant_id} to {row.partner_id}"
    return row_trusted(engine, PARTNER_TABLE, row, what)


def policy_row_trusted(engine: Engine | None, row: Any) -> bool:
    """Whether a tenant's policy row may be applied (``row_trusted``)."""
    return row_trusted(engine, POLICY_TABLE, row, f"policy of tenant {row.tenant_id}")


def version_row_trusted(engine: Engine | None, row: Any) -> bool:
    """Whether a model version row (its deployment state included) may be believed
    (KeyProviderError when the signing keys cannot be read: then nothing is served)."""
    what = f"model {row.name} v{row.version}"
    return row_trusted(engine, VERSION_TABLE, row, what, strict_keys=True)
