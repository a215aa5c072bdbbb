from __future__ import annotations

from fastapi import APIRouter, HTTPException, status
from sqlmodel import col, select

from serving.protocols.v1.deps import AdminCaller, ConfigDep, SessionDep
from serving.refusals import refusal_for
from serving.schemas import KeyCreate, KeyCreated, KeyPublic
from tenancy.errors import Conflict, InvalidInput, NotFound
from tenancy.tables import ApiKey, utcnow
from tenancy.tenants import create_api_key, revoke_api_key

router = APIRouter(prefix="/v1/keys", tags=["keys"])


def _public(key: ApiKey) -> KeyPublic:
    return KeyPublic(
        id=key.id,
        name=key.name,
        prefix=key.prefix,
        scopes=key.scopes.split(","),
        created_at=key.created_at,
        expires_at=key.expires_at,
        revoked_at=key.revoked_at,
    )


@router.post("", response_model=KeyCreated, status_code=status.HTTP_201_CREATED)
def create(
    body: KeyCreate, caller: AdminCaller, session: SessionDep, config: ConfigDep
) -> KeyCreated:
    if body.expires_at is not None and body.expires_at.utcoffset() is None:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "expires_at needs a time zone.")
    if body.expires_at is not None and body.expires_at <= utcnow():
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "expires_at is in the past.")
    try:
        key, secret = create_api_key(
            session=session,
            tenant=caller.tenant,
            scopes=body.scopes,
            name=body.name,
            expires_at=body.expires_at,
            max_keys=config.max_keys_per_tenant,
        )
    except InvalidInput as exc:
        raise refusal_for(exc) from None
    except Conflict as exc:  # the tenant's live keys are at the limit
        session.rollback()
        raise refusal_for(exc) from None
    session.commit()
    return KeyCreated(key=_public(key), secret=secret)


@router.get("", response_model=list[KeyPublic])
def list_keys(caller: AdminCaller, session: SessionDep) -> list[KeyPublic]:
    rows = session.exec(
        select(ApiKey).where(ApiKey.tenant_id == caller.tenant.id).order_by(col(ApiKey.created_at))
    )
    return [_public(k) for k in rows]


@router.delete("/{key_id}", response_model=KeyPublic)
def revoke(key_id: str, caller: AdminCaller, session: SessionDep) -> KeyPublic:
    try:
        key = revoke_api_key(session=session, tenant_id=caller.tenant.id, key_id=key_id)
    except NotFound as exc:
        raise refusal_for(exc, "No such key.") from None
    session.commit()  # the revocation holds from the next request on (tenancy tells serving)
    return _public(key)
