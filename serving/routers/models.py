from __future__ import annotations

import json
import logging

from fastapi import APIRouter, HTTPException, status
from sqlmodel import col, func, select
from starlette.concurrency import run_in_threadpool

from serving.deps import AdminCaller, CacheDep, ConfigDep, PredictCaller, SessionDep
from serving.registry import NotDeployed
from serving.schemas import (
    LabelScore,
    ModelPublic,
    ModelVersionPublic,
    PredictRequest,
    PredictResponse,
)
from tenancy.errors import DecryptionError, IntegrityError, NotFound
from tenancy.registry import deploy_version
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
def deploy(name: str, version: int, caller: AdminCaller, session: SessionDep) -> ModelVersionPublic:
    _versions(session, caller.tenant.id, name)
    try:
        row = deploy_version(
            session=session, tenant_id=caller.tenant.id, name=name, version=version
        )
    except NotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    session.commit()
    return _version_public(row)


@router.post("/{name}/predict", response_model=PredictResponse)
async def predict(
    name: str,
    body: PredictRequest,
    caller: PredictCaller,
    session: SessionDep,
    cache: CacheDep,
    config: ConfigDep,
) -> PredictResponse:
    if len(body.inputs) > config.max_predict_inputs:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"At most {config.max_predict_inputs} inputs per request; got {len(body.inputs)}.",
        )
    for i, text in enumerate(body.inputs):
        if len(text) > config.max_input_chars:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                f"inputs[{i}] has {len(text)} characters; the limit is {config.max_input_chars}.",
            )
        if not text.strip():
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"inputs[{i}] is empty.")
    _versions(session, caller.tenant.id, name)
    try:
        served = await run_in_threadpool(cache.get_deployed, session, caller.tenant.id, name)
    except NotDeployed as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    except (DecryptionError, IntegrityError) as exc:
        log.error("model %s of tenant %s failed its check: %s", name, caller.tenant.id, exc)
        raise HTTPException(
            status.HTTP_500_INTERNAL_SERVER_ERROR,
            "The stored model failed its integrity check; the operator has been alerted.",
        ) from None
    top_k = min(body.top_k, len(served.spec.labels))
    rows = await run_in_threadpool(served.predict, body.inputs, top_k)
    return PredictResponse(
        model=served.name,
        version=served.version,
        predictions=[[LabelScore(label=lab, score=s) for lab, s in row] for row in rows],
    )
