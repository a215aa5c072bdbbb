"""Federation node keys enrolled for a tenant: the binding of a node's identity to its tenant.

Flower's SuperNode authentication proves a node holds *some* key registered with the
SuperLink; nothing there says which tenant the node trains for. A key enrolled here is
enrolled for exactly one tenant (by the operator, or by that tenant's own admin), and the
coordinator takes a node's tenant from the tenant its authenticated key is enrolled for,
never from what the node says (``server.discovery``).

Keys are identified by their fingerprint (SHA-256 of the DER SubjectPublicKeyInfo,
computed by the caller with ``privacy.node_proof.fingerprint``: tenancy parses no keys).
A fingerprint belongs to one tenant forever: a revoked key may be enrolled again by the
same tenant, never by another.

An enrollment is ``proven`` when the key's holder signed a request for it
(``serving.node_enrollment``). A proven enrollment takes a key over from an unproven one
held by another tenant: public keys are public, and without this anyone could enroll
another tenant's key first (its own enrollment refused: a denial of service). An unproven
enrollment (a bare public key, as before) still works; it yields to its key's holder.

Each enrollment row is signed by the platform's signing key (``tenancy.signing``: on insert,
and again when revoked or enrolled again), and ``tenant_of_key`` believes only a row whose
signature verifies: someone who can write the database but holds no signing key cannot
enroll a key for another tenant, nor move an enrolled key to one.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime

from sqlalchemy import false
from sqlmodel import Field, Session, SQLModel, select

from tenancy.errors import Conflict, InvalidInput, NotFound
from tenancy.signing import mark_repaired, node_row_trusted
from tenancy.tables import Tenant, utcnow

log = logging.getLogger(__name__)
_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")
# At most this many live keys per tenant (a node per site; rotation overlaps two).
MAX_KEYS_PER_TENANT = 64


class NodeKey(SQLModel, table=True):
    """One node public key, enrolled for one tenant."""

    __tablename__ = "node_key"
    fingerprint: str = Field(primary_key=True, max_length=64)
    tenant_id: str = Field(foreign_key="tenant.id", index=True)
    public_key: str  # OpenSSH one-line form
    enrolled_by: str = Field(max_length=255)  # "operator" or "api-key:<id>"
    created_at: datetime = Field(default_factory=utcnow)
    revoked_at: datetime | None = None
    signature: str | None = Field(default=None, max_length=160)  # tenancy.signing
    # The key's holder signed a request to enroll it for this tenant (migration 0010).
    # (A server default, so that rows written by other means, older code included, are
    # unproven rather than refused.)
    proven: bool = Field(default=False, sa_column_kwargs={"server_default": false()})


def _check_fingerprint(fingerprint: str) -> str:
    if not _FINGERPRINT.match(fingerprint):
        raise InvalidInput(f"{fingerprint!r} is not a key fingerprint (64 hex digits).")
    return fingerprint


def enroll_node_key(
    session: Session,
    *,
    tenant_id: str,
    fingerprint: str,
    public_key: str,
    enrolled_by: str,
    proven: bool = False,
) -> tuple[NodeKey, bool]:
    """Enroll a node key for ``tenant_id``; returns (row, created).

    ``proven``: the caller checked a request signed by the key's holder for this tenant.
    Enrolling a key this tenant already holds is a no-op (a revoked one becomes live
    again; a proof is recorded). A key enrolled for any other tenant is refused with
    ``Conflict``, without saying which tenant holds it, unless this enrollment is proven
    and that one is not: the holder's proof wins (the other tenant's row moves, logged).
    """
    _check_fingerprint(fingerprint)
    row = session.get(NodeKey, fingerprint, with_for_update=True)
    if row is not None:
        if row.tenant_id != tenant_id:
            if not proven or row.proven:
                raise Conflict(
                    "This node key cannot be enrolled: it is enrolled elsewhere. If it is "
                    "your node's, enroll a request signed by its key (`fedtext federation "
                    "enrollment-request` at the node's site): the key's holder wins."
                )
            log.warning(
                "node key %s taken over by the tenant its holder proved it for",
                fingerprint[:16],
                extra={"fields": {"from": row.tenant_id, "to": tenant_id}},
            )
            # Every field is replaced (the fingerprint is the proven key's): signed anew
            # even if the row it replaces did not verify.
            row.tenant_id = tenant_id
            row.public_key = public_key
            row.enrolled_by = enrolled_by
            row.created_at = utcnow()
            row.revoked_at = None
            row.proven = True
            mark_repaired(row)
            session.add(row)
            session.flush()
            return row, True
        changed = row.revoked_at is not None or (proven and not row.proven)
        if not changed:
            return row, False
        row.revoked_at = None
        row.proven = row.proven or proven
        session.add(row)
        session.flush()
        return row, True
    live = session.exec(
        select(NodeKey).where(NodeKey.tenant_id == tenant_id, NodeKey.revoked_at.is_(None))  # type: ignore[union-attr]
    ).all()
    if len(live) >= MAX_KEYS_PER_TENANT:
        raise Conflict(
            f"This tenant already has {len(live)} enrolled node keys (the most is "
            f"{MAX_KEYS_PER_TENANT}); revoke one first."
        )
    row = NodeKey(
        fingerprint=fingerprint,
        tenant_id=tenant_id,
        public_key=public_key,
        enrolled_by=enrolled_by,
        proven=proven,
    )
    session.add(row)
    session.flush()
    return row, True


def list_node_keys(
    session: Session, tenant_id: str, *, include_revoked: bool = False
) -> list[NodeKey]:
    """The tenant's node keys, oldest first."""
    query = select(NodeKey).where(NodeKey.tenant_id == tenant_id)
    if not include_revoked:
        query = query.where(NodeKey.revoked_at.is_(None))  # type: ignore[union-attr]
    return list(session.exec(query.order_by(NodeKey.created_at)))  # type: ignore[arg-type]


def revoke_node_key(session: Session, *, tenant_id: str, fingerprint: str) -> NodeKey:
    """Revoke the tenant's key ``fingerprint``; ``NotFound`` when the tenant holds no such
    live key (another tenant's key is not found either)."""
    row = session.get(NodeKey, fingerprint, with_for_update=True)
    if row is None or row.tenant_id != tenant_id or row.revoked_at is not None:
        raise NotFound(f"No enrolled node key {fingerprint}.")
    row.revoked_at = utcnow()
    session.add(row)
    session.flush()
    return row


def tenant_of_key(session: Session, fingerprint: str) -> Tenant | None:
    """The live tenant a live key is enrolled for, or None (not enrolled, revoked, its
    tenant deleted, or the enrollment row's signature not accepted: an unsigned or altered
    row binds nothing, and is logged)."""
    row = session.get(NodeKey, fingerprint)
    if row is None or row.revoked_at is not None:
        return None
    if not node_row_trusted(session.get_bind().engine, row):
        return None
    tenant = session.get(Tenant, row.tenant_id)
    if tenant is None or tenant.deleted_at is not None:
        return None
    return tenant
