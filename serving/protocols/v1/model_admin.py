"""Model version admin beyond list and deploy: read one version, roll back."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status
from sqlmodel import col, select

from serving.protocols.v1.deps import AdminCaller, SessionDep, VersionPath
from serving.protocols.v1.models import _version, _version_public, _versions
from serving.refusals import refusal_for
from serving.schemas import ModelVersionPublic
from tenancy.registry import UntrustedDeployment, deploy_version
from tenancy.tables import ModelVersion

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("/{name}/versions/{version}", response_model=ModelVersionPublic)
def get_one(
    name: str, version: VersionPath, caller: AdminCaller, session: SessionDep
) -> ModelVersionPublic:
    return _version_public(_version(session, caller.tenant.id, name, version))


@router.post("/{name}/rollback", response_model=ModelVersionPublic)
def rollback(name: str, caller: AdminCaller, session: SessionDep) -> ModelVersionPublic:
    """Deploy the newest version older than the deployed one."""
    rows = _versions(session, caller.tenant.id, name)
    current = next((r for r in rows if r.deployed), None)
    if current is None:
        raise HTTPException(status.HTTP_409_CONFLICT, f"Model {name!r} has no deployed version.")
    earlier = session.exec(
        select(ModelVersion.version)
        .where(
            ModelVersion.tenant_id == caller.tenant.id,
            ModelVersion.name == name,
            ModelVersion.version < current.version,
        )
        .order_by(col(ModelVersion.version).desc())
    ).first()
    if earlier is None:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"Version {current.version} of {name!r} is the oldest; nothing to roll back to.",
        )
    try:
        row = deploy_version(
            session=session, tenant_id=caller.tenant.id, name=name, version=earlier
        )
    except UntrustedDeployment as exc:
        raise refusal_for(exc) from None
    session.commit()  # deploy_version announces it: the predict memo is cleared on commit
    return _version_public(row)
