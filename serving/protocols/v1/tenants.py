from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, status
from sqlmodel import Session

from privacy.budget import BudgetError, check_epsilon_budget
from runs.lifecycle import active_runs_of, cancel_run, request_cancel, withdraw_cancel
from serving.protocols.v1.deps import (
    ConfigDep,
    Operator,
    OptionalRunLauncherDep,
    PlatformDep,
    SessionDep,
)
from serving.refusals import refusal_for
from serving.schemas import TenantCreate, TenantCreated, TenantDeleted, TenantPublic
from tenancy.errors import Conflict, InvalidInput, NotFound
from tenancy.rotation import delete_tenant, deleted_tenants
from tenancy.tables import Tenant
from tenancy.tenants import Scope, create_api_key, create_tenant, list_tenants

router = APIRouter(prefix="/v1/tenants", tags=["tenants"])
DELETION = "operator (tenant deletion)"


@router.post("", response_model=TenantCreated, status_code=status.HTTP_201_CREATED)
def create(
    body: TenantCreate,
    _operator: Operator,
    session: SessionDep,
    platform: PlatformDep,
    config: ConfigDep,
) -> TenantCreated:
    try:
        check_epsilon_budget(body.budget_epsilon, max_epsilon=config.max_budget_epsilon)
    except BudgetError as exc:
        raise refusal_for(exc) from None
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
        raise refusal_for(exc) from None
    except Conflict as exc:
        session.rollback()
        raise refusal_for(exc) from None
    session.commit()
    return TenantCreated(
        tenant=TenantPublic.model_validate(tenant, from_attributes=True), admin_key=secret
    )


@router.get("", response_model=list[TenantPublic])
def list_all(
    _operator: Operator,
    session: SessionDep,
    include_deleted: Annotated[bool, Query(description="Also deleted tenants.")] = False,
) -> list[TenantPublic]:
    rows = list_tenants(session=session)
    if include_deleted:
        rows += deleted_tenants(session)
    return [TenantPublic.model_validate(t, from_attributes=True) for t in rows]


@router.delete("/{tenant_id}", response_model=TenantDeleted)
def delete(
    tenant_id: str,
    _operator: Operator,
    platform: PlatformDep,
    launcher: OptionalRunLauncherDep,
) -> TenantDeleted:
    """Crypto-shred a tenant: data key destroyed, blobs removed, keys revoked; ledger kept.

    Its runs in progress are cancelled first (by "operator (tenant deletion)"); their
    checkpoints and every run's scratch files derived from its text are removed."""
    with Session(platform.engine) as session:
        tenant = session.get(Tenant, tenant_id)
    if tenant is None or tenant.deleted_at is not None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "No such tenant.")
    if launcher is not None:
        for run in active_runs_of(platform.engine, tenant_id=tenant_id, name=tenant.name):
            if not request_cancel(platform.engine, run.id, DELETION):
                continue  # it ended meanwhile
            try:
                launcher.cancel(run.id, run.worker_pid)
            except OSError as exc:  # the federation did not confirm the stop
                withdraw_cancel(platform.engine, run.id)
                raise HTTPException(
                    status.HTTP_503_SERVICE_UNAVAILABLE,
                    f"Run {run.id} of this tenant could not be stopped ({exc}); nothing was "
                    "deleted. Try again.",
                ) from None
            cancel_run(platform.engine, run.id, DELETION)
    # The predict service hears of it from tenancy as it commits: it forgets the tenant's
    # keys and drops its decrypted models (no decrypted copy outlives the key).
    try:
        done = delete_tenant(platform.engine, platform.keyring, platform.store, tenant_id=tenant_id)
    except NotFound as exc:
        raise refusal_for(exc) from None
    if launcher is not None:
        launcher.sweep()  # scratch directories of ended runs (a worker killed earlier)
    with Session(platform.engine) as session:
        row = session.get(Tenant, tenant_id)
    return TenantDeleted(
        tenant=TenantPublic.model_validate(row, from_attributes=True),
        revoked_keys=done.revoked_keys,
        destroyed_data_keys=done.destroyed_data_keys,
        removed_blobs=done.removed_blobs,
    )
