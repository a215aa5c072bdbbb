"""Tenants and API keys: creation, lookup, authentication and scopes."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from datetime import datetime
from enum import StrEnum

from sqlmodel import Session, select

from tenancy.errors import Conflict, InvalidInput, NotFound
from tenancy.keyring import Keyring
from tenancy.tables import ApiKey, Tenant, utcnow

_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
KEY_PREFIX = "ftk"


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
    if not 0 < budget_delta < 1:
        raise InvalidInput("The budget delta should be in (0, 1).")
    if session.exec(select(Tenant).where(Tenant.name == name)).first() is not None:
        raise Conflict(f"A tenant named {name!r} already exists.")
    tenant = Tenant(name=name, budget_epsilon=budget_epsilon, budget_delta=budget_delta)
    session.add(tenant)
    session.flush()
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
) -> tuple[ApiKey, str]:
    """A new key; the plaintext is returned once and never stored."""
    parsed = parse_scopes(scopes)
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


def authenticate(*, session: Session, presented: str) -> tuple[ApiKey, Tenant] | None:
    """The live key and its tenant for ``presented``, or None (unknown, revoked, expired)."""
    parts = presented.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX:
        return None
    row = session.exec(select(ApiKey).where(ApiKey.prefix == parts[1])).first()
    if row is None or not hmac.compare_digest(row.key_hash, hash_key(presented)):
        return None
    if row.revoked_at is not None or (row.expires_at is not None and row.expires_at <= utcnow()):
        return None
    tenant = session.get(Tenant, row.tenant_id)
    if tenant is None or tenant.deleted_at is not None:
        return None
    return row, tenant


def key_scopes(key: ApiKey) -> set[Scope]:
    return {Scope(s) for s in key.scopes.split(",") if s}


def has_scope(key: ApiKey, needed: Scope) -> bool:
    """Admin keys may also predict; a predict key may only predict."""
    scopes = key_scopes(key)
    return needed in scopes or Scope.admin in scopes
