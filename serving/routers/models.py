"""Model versions (admin) and predictions (predict keys)."""

from __future__ import annotations

import json
import logging

from fastapi import APIRouter, HTTPException, Response, status
from sqlmodel import col, func, select

from serving.deps import (
    AdminCaller,
    PredictServiceDep,
    PredictTargetDep,
    SessionDep,
    VersionPath,
    refused,
)
from serving.model_options import ServingOptions, ServingOptionsPublic
from serving.predict import Refusal
from serving.schemas import (
    ModelPublic,
    ModelVersionPublic,
    PredictRequest,
    PredictResponse,
)
from tenancy.errors import NotFound
from tenancy.registry import deploy_version, get_version, set_quantize
from tenancy.tables import ModelVersion

router = APIRouter(prefix="/v1/models", tags=["models"])
log = logging.getLogger("fedtext.serving")


def _version_public(row: ModelVersion) -> ModelVersionPublic:
    return ModelVersionPublic(
        name=row.name,
        version=row.version,
        deployed=row.deployed,
        created_at=row.created_at,
        run_id=row.run_id,
        size_bytes=row.size_bytes,
        spec=json.loads(row.spec_json),
        metrics=json.loads(row.metrics_json),
    )


def _versions(session: SessionDep, tenant_id: str, name: str) -> list[ModelVersion]:
    rows = list(
        session.exec(
            select(ModelVersion)
            .where(ModelVersion.tenant_id == tenant_id, ModelVersion.name == name)
            .order_by(col(ModelVersion.version))
        )
    )
    if not rows:
        # Another tenant's model and a missing one look the same: 404.
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"No model named {name!r}.")
    return rows


@router.get("", response_model=list[ModelPublic])
def list_models(caller: AdminCaller, session: SessionDep) -> list[ModelPublic]:
    rows = session.exec(
        select(ModelVersion.name, func.count(), func.max(ModelVersion.version))
        .where(ModelVersion.tenant_id == caller.tenant.id)
        .group_by(ModelVersion.name)
        .order_by(ModelVersion.name)
    ).all()
    out = []
    for name, count, _ in rows:
        deployed = session.exec(
            select(ModelVersion.version).where(
                ModelVersion.tenant_id == caller.tenant.id,
                ModelVersion.name == name,
                col(ModelVersion.deployed).is_(True),
            )
        ).first()
        out.append(ModelPublic(name=name, versions=count, deployed_version=deployed))
    return out


@router.get("/{name}/versions", response_model=list[ModelVersionPublic])
def list_versions(name: str, caller: AdminCaller, session: SessionDep) -> list[ModelVersionPublic]:
    return [_version_public(r) for r in _versions(session, caller.tenant.id, name)]


@router.post("/{name}/versions/{version}/deploy", response_model=ModelVersionPublic)
def deploy(
    name: str, version: VersionPath, caller: AdminCaller, session: SessionDep
) -> ModelVersionPublic:
    _versions(session, caller.tenant.id, name)
    try:
        row = deploy_version(
            session=session, tenant_id=caller.tenant.id, name=name, version=version
        )
    except NotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    session.commit()  # the predict memo hears of it from tenancy (serving/predict.py)
    return _version_public(row)


@router.get("/{name}/versions/{version}/serving", response_model=ServingOptionsPublic)
def get_serving_options(
    name: str, version: VersionPath, caller: AdminCaller, session: SessionDep
) -> ServingOptionsPublic:
    row = _version(session, caller.tenant.id, name, version)
    return ServingOptionsPublic(
        name=row.name, version=row.version, deployed=row.deployed, quantize=row.quantize
    )


@router.put("/{name}/versions/{version}/serving", response_model=ServingOptionsPublic)
def set_serving_options(
    name: str,
    version: VersionPath,
    body: ServingOptions,
    caller: AdminCaller,
    session: SessionDep,
) -> ServingOptionsPublic:
    """Choose how a version is served (e.g. dynamic int8); the next request reloads it."""
    _version(session, caller.tenant.id, name, version)
    row = set_quantize(
        session=session,
        tenant_id=caller.tenant.id,
        name=name,
        version=version,
        quantize=body.quantize,
    )
    session.commit()
    return ServingOptionsPublic(
        name=row.name, version=row.version, deployed=row.deployed, quantize=row.quantize
    )


def _version(session: SessionDep, tenant_id: str, name: str, version: int) -> ModelVersion:
    _versions(session, tenant_id, name)
    try:
        return get_version(session=session, tenant_id=tenant_id, name=name, version=version)
    except NotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None


@router.post("/{name}/predict", response_model=PredictResponse)
async def predict(
    body: PredictRequest, target: PredictTargetDep, service: PredictServiceDep
) -> Response:
    """Top-k labels per input; the forward pass is shared with concurrent requests.

    The predict service's FastAPI adapter (serving/predict.py); warm requests are answered
    by its ASGI adapter, serving/fastlane.py, before they get here.
    """
    try:
        content = await service.answer(target, body)
    except Refusal as exc:
        raise refused(exc) from None
    return Response(content, media_type="application/json")
