from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from serving.deps import Operator, PlatformDep, SessionDep
from serving.schemas import TenantCreate, TenantCreated, TenantPublic
from tenancy.errors import Conflict, InvalidInput
from tenancy.tenants import Scope, create_api_key, create_tenant, list_tenants

router = APIRouter(prefix="/v1/tenants", tags=["tenants"])


@router.post("", response_model=TenantCreated, status_code=status.HTTP_201_CREATED)
def create(
    body: TenantCreate, _operator: Operator, session: SessionDep, platform: PlatformDep
) -> TenantCreated:
    try:
        tenant = create_tenant(
            session=session,
            keyring=platform.keyring,
            name=body.name,
            budget_epsilon=body.budget_epsilon,
            budget_delta=body.budget_delta,
        )
        _, secret = create_api_key(
            session=session, tenant=tenant, scopes=[Scope.admin], name="first admin key"
        )
    except InvalidInput as exc:
        session.rollback()
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    except Conflict as exc:
        session.rollback()
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    session.commit()
    return TenantCreated(
        tenant=TenantPublic.model_validate(tenant, from_attributes=True), admin_key=secret
    )


@router.get("", response_model=list[TenantPublic])
def list_all(_operator: Operator, session: SessionDep) -> list[TenantPublic]:
    return [
        TenantPublic.model_validate(t, from_attributes=True) for t in list_tenants(session=session)
    ]
