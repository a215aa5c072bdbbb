"""Tenants and API keys: creation, lookup, authentication and scopes."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from datetime import datetime
from enum import StrEnum

from sqlmodel import Session, col, delete, func, or_, select

from tenancy.errors import Conflict, InvalidInput, NotFound
from tenancy.events import Change, ChangeKind, record
from tenancy.governance import TenantPolicy
from tenancy.keyring import Keyring
from tenancy.signing import key_row_trusted, partner_row_trusted
from tenancy.tables import ApiKey, FederationPartner, Tenant, UnmatchedPartner, utcnow

_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
KEY_PREFIX = "ftk"
# delta is the chance that the epsilon guarantee fails outright (for example by one record
# released whole); it must stay far below 1/n for n records. 1e-3 is 1/n for a thousand
# records: a generous ceiling (planning further requires delta < 1/n for each tenant).
MAX_BUDGET_DELTA = 1e-3
# Live (unrevoked, unexpired) keys a tenant may hold; FEDTEXT_MAX_KEYS_PER_TENANT.
DEFAULT_MAX_KEYS_PER_TENANT = 100


class Scope(StrEnum):
    admin = "admin"
    predict = "predict"


def check_name(name: str, what: str = "tenant name") -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidInput(
            f"Invalid {what} {name!r}: use 1-63 lowercase letters, digits and inner hyphens."
        )
    return name


def parse_scopes(scopes: Iterable[str] | str) -> list[Scope]:
    items = scopes.split(",") if isinstance(scopes, str) else list(scopes)
    parsed: list[Scope] = []
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        try:
            scope = Scope(item)
        except ValueError:
            raise InvalidInput(
                f"Unknown scope {item!r}; known: {', '.join(s.value for s in Scope)}."
            ) from None
        if scope not in parsed:
            parsed.append(scope)
    if not parsed:
        raise InvalidInput("At least one scope is needed.")
    return parsed


def create_tenant(
    *,
    session: Session,
    keyring: Keyring,
    name: str,
    budget_epsilon: float = 10.0,
    budget_delta: float = 1e-5,
) -> Tenant:
    """A new tenant with its own wrapped data key."""
    check_name(name)
    if not budget_epsilon > 0:
        raise InvalidInput("The epsilon budget should be a positive value.")
    if not 0 < budget_delta <= MAX_BUDGET_DELTA:
        raise InvalidInput(
            f"The budget delta should be in (0, {MAX_BUDGET_DELTA:g}] (it is {budget_delta:g}): "
            "delta is the chance the guarantee fails outright and must stay far below 1/n; "
            "1e-5 is usual."
        )
    if session.exec(select(Tenant).where(Tenant.name == name)).first() is not None:
        raise Conflict(f"A tenant named {name!r} already exists.")
    tenant = Tenant(name=name, budget_epsilon=budget_epsilon, budget_delta=budget_delta)
    session.add(tenant)
    session.flush()
    # The default policy as a signed row: a missing row is read as the strictest.
    session.add(TenantPolicy(tenant_id=tenant.id, updated_by="created with the tenant"))
    keyring.create_data_key(session, tenant)
    return tenant


def get_tenant(*, session: Session, name: str) -> Tenant:
    tenant = session.exec(
        select(Tenant).where(Tenant.name == name, Tenant.deleted_at == None)  # noqa: E711
    ).first()
    if tenant is None:
        raise NotFound(f"No tenant named {name!r}.")
    return tenant


def list_tenants(*, session: Session) -> list[Tenant]:
    return list(
        session.exec(select(Tenant).where(Tenant.deleted_at == None).order_by(Tenant.name))  # noqa: E711
    )


def hash_key(key: str) -> str:
    # Keys carry 256 random bits, so a fast hash is enough (no password stretching needed).
    return hashlib.sha256(key.encode()).hexdigest()


def create_api_key(
    *,
    session: Session,
    tenant: Tenant,
    scopes: Iterable[str] | str,
    name: str = "",
    expires_at: datetime | None = None,
    max_keys: int = DEFAULT_MAX_KEYS_PER_TENANT,
) -> tuple[ApiKey, str]:
    """A new key; the plaintext is returned once and never stored.

    Conflict when the tenant already holds ``max_keys`` live keys (revoked and expired
    ones do not count): unlimited keys are unlimited rows and lookups for one admin.
    """
    parsed = parse_scopes(scopes)
    _check_key_count(session, tenant, max_keys)
    prefix = secrets.token_hex(6)
    plaintext = f"{KEY_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"
    row = ApiKey(
        tenant_id=tenant.id,
        name=name,
        prefix=prefix,
        key_hash=hash_key(plaintext),
        scopes=",".join(s.value for s in parsed),
        expires_at=expires_at,
    )
    session.add(row)
    session.flush()
    return row, plaintext


def _check_key_count(session: Session, tenant: Tenant, max_keys: int) -> None:
    # The tenant's row is locked (PostgreSQL), so two concurrent creations cannot both
    # take the last place; SQLite serializes writers anyway.
    session.exec(select(Tenant.id).where(Tenant.id == tenant.id).with_for_update()).first()
    now = utcnow()
    live = session.exec(
        select(func.count())
        .select_from(ApiKey)
        .where(
            ApiKey.tenant_id == tenant.id,
            col(ApiKey.revoked_at).is_(None),
            or_(col(ApiKey.expires_at).is_(None), col(ApiKey.expires_at) > now),
        )
    ).one()
    if live >= max_keys:
        raise Conflict(
            f"The tenant already has {live} live API keys, the most allowed "
            f"({max_keys}): revoke keys it no longer uses (DELETE /v1/keys/{{id}})."
        )


def is_live(key: ApiKey, tenant: Tenant | None, now: datetime | None = None) -> bool:
    """Whether ``key`` answers for ``tenant``: not revoked, not expired, tenant not deleted.

    The one rule: authentication and every memo of its answers (serving/runtime/lookups.py) use it.
    """
    if key.revoked_at is not None or tenant is None or tenant.deleted_at is not None:
        return False
    return key.expires_at is None or key.expires_at > (now if now is not None else utcnow())


def authenticate(*, session: Session, presented: str) -> tuple[ApiKey, Tenant] | None:
    """The live key and its tenant for ``presented``, or None (unknown or not ``is_live``)."""
    parts = presented.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX:
        return None
    row = session.exec(select(ApiKey).where(ApiKey.prefix == parts[1])).first()
    if row is None or not hmac.compare_digest(row.key_hash, hash_key(presented)):
        return None
    if not key_row_trusted(session.get_bind().engine, row):
        return None  # a key row written around the platform (no valid signature): logged
    tenant = session.get(Tenant, row.tenant_id)
    if tenant is None or not is_live(row, tenant):
        return None
    return row, tenant


def revoke_api_key(*, session: Session, tenant_id: str, key_id: str) -> ApiKey:
    """Revoke one of ``tenant_id``'s keys (idempotent); it stops working once committed.

    Another tenant's key and a missing one are the same NotFound.
    """
    key = session.get(ApiKey, key_id)
    if key is None or key.tenant_id != tenant_id:
        raise NotFound("No such key.")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.add(key)
        session.flush()
        record(session, Change(ChangeKind.key_revoked, tenant_id))
    return key


def key_scopes(key: ApiKey) -> set[Scope]:
    return {Scope(s) for s in key.scopes.split(",") if s}


def has_scope(key: ApiKey, needed: Scope) -> bool:
    """Admin keys may also predict; a predict key may only predict."""
    scopes = key_scopes(key)
    return needed in scopes or Scope.admin in scopes


# ---------------------------------------------------------------- consent between tenants


def partner_names(*, session: Session, tenant_id: str) -> list[str]:
    """The names ``tenant_id``'s admin listed as partners, sorted: live tenants whose consent
    row verifies, and names that were no tenant's when listed (``UnmatchedPartner``: they
    grant nothing but are answered alike, so this tells no tenant name from an unknown one)."""
    engine = session.get_bind().engine
    names = {
        tenant.name
        for consent, tenant in session.exec(
            select(FederationPartner, Tenant)
            .join(Tenant, col(FederationPartner.partner_id) == col(Tenant.id))
            .where(FederationPartner.tenant_id == tenant_id, col(Tenant.deleted_at).is_(None))
        )
        if partner_row_trusted(engine, consent)
    }
    names.update(
        session.exec(select(UnmatchedPartner.name).where(UnmatchedPartner.tenant_id == tenant_id))
    )
    return sorted(names)


def live_tenants(*, session: Session, names: Iterable[str]) -> tuple[dict[str, Tenant], list[str]]:
    """The live (not deleted) tenants named in ``names``, by name, and the names not found."""
    wanted = list(names)
    found = {
        t.name: t
        for t in session.exec(
            select(Tenant).where(col(Tenant.name).in_(wanted), col(Tenant.deleted_at).is_(None))
        )
    }
    return found, [n for n in wanted if n not in found]


def set_partners(*, session: Session, tenant: Tenant, names: Iterable[str]) -> list[str]:
    """Replace the tenants that may start runs including ``tenant``; the names, sorted.

    A valid name that is no live tenant's is kept as given and answered like the others
    (``partner_names``), so the answer never tells tenant names from unknown ones; it
    grants nothing. InvalidInput only for what no tenant name can be (and for ``tenant``'s
    own name, which it knows).
    """
    wanted = sorted({check_name(n) for n in names})
    if tenant.name in wanted:
        raise InvalidInput("A tenant is always part of its own runs; do not list it.")
    found, missing = live_tenants(session=session, names=wanted)
    session.exec(delete(FederationPartner).where(col(FederationPartner.tenant_id) == tenant.id))  # type: ignore[call-overload]
    session.exec(delete(UnmatchedPartner).where(col(UnmatchedPartner.tenant_id) == tenant.id))  # type: ignore[call-overload]
    for partner in found.values():
        session.add(FederationPartner(tenant_id=tenant.id, partner_id=partner.id))
    for name in missing:
        session.add(UnmatchedPartner(tenant_id=tenant.id, name=name))
    session.flush()
    return wanted


def without_consent(*, session: Session, owner_id: str, participants: list[Tenant]) -> list[str]:
    """Names of ``participants`` that have not let ``owner_id`` include them in its runs
    (a consent row whose signature does not verify is no consent, logged)."""
    engine = session.get_bind().engine
    agreed = {
        row.tenant_id
        for row in session.exec(
            select(FederationPartner).where(FederationPartner.partner_id == owner_id)
        )
        if partner_row_trusted(engine, row)
    }
    return sorted(t.name for t in participants if t.id != owner_id and t.id not in agreed)


def forget_partners(*, session: Session, tenant_id: str) -> None:
    """Drop every consent given by or to ``tenant_id`` (its deletion)."""
    session.exec(delete(UnmatchedPartner).where(col(UnmatchedPartner.tenant_id) == tenant_id))  # type: ignore[call-overload]
    session.exec(  # type: ignore[call-overload]
        delete(FederationPartner).where(
            or_(
                col(FederationPartner.tenant_id) == tenant_id,
                col(FederationPartner.partner_id) == tenant_id,
            )
        )
    )
