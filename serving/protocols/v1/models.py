"""Model versions (admin) and predictions (predict keys)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging

from fastapi import APIRouter, HTTPException, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from sqlmodel import col, func, select

from serving.model_options import ServingOptions, ServingOptionsPublic
from serving.predict import PredictTarget
from serving.protocols.v1.deps import (
    AdminCaller,
    PredictServiceDep,
    PredictTargetDep,
    SessionDep,
    VersionPath,
)
from serving.refusals import refusal_for
from serving.schemas import (
    EXPLAIN_MAX_STEPS,
    ExplainRequest,
    ExplainResponse,
    ModelPublic,
    ModelVersionPublic,
    PredictRequest,
    PredictResponse,
    ReleasedMetrics,
)
from tenancy.errors import NotFound
from tenancy.registry import (
    UntrustedDeployment,
    deploy_version,
    deployed_version,
    get_version,
    set_quantize,
)
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
        metrics=(metrics := json.loads(row.metrics_json)),
        released=ReleasedMetrics.from_metrics(metrics, row.version),
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
        # The version that serves: one deployed through the platform.
        row = deployed_version(session=session, tenant_id=caller.tenant.id, name=name)
        out.append(
            ModelPublic(name=name, versions=count, deployed_version=row.version if row else None)
        )
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
        raise refusal_for(exc) from None
    except UntrustedDeployment as exc:
        raise refusal_for(exc) from None
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
    try:
        row = set_quantize(
            session=session,
            tenant_id=caller.tenant.id,
            name=name,
            version=version,
            quantize=body.quantize,
        )
    except UntrustedDeployment as exc:
        raise refusal_for(exc) from None
    session.commit()
    return ServingOptionsPublic(
        name=row.name, version=row.version, deployed=row.deployed, quantize=row.quantize
    )


def _version(session: SessionDep, tenant_id: str, name: str, version: int) -> ModelVersion:
    _versions(session, tenant_id, name)
    try:
        return get_version(session=session, tenant_id=tenant_id, name=name, version=version)
    except NotFound as exc:
        raise refusal_for(exc) from None


@router.post("/{name}/predict", response_model=PredictResponse)
async def predict(
    request: Request, body: PredictRequest, target: PredictTargetDep, service: PredictServiceDep
) -> Response:
    """Top-k labels per input; the forward pass is shared with concurrent requests.

    The predict service's FastAPI adapter (serving/predict.py); warm requests are answered
    by its ASGI adapter, serving/protocols/v1/fastlane.py, before they get here.
    """
    if body.explain and len(body.inputs) * EXPLAIN_STEPS > EXPLAIN_MAX_STEPS:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f'"explain": true takes at most {EXPLAIN_MAX_STEPS // EXPLAIN_STEPS} inputs; '
            f"got {len(body.inputs)}.",
        )
    content = await service.answer(target, body)  # a Refusal: serving/refusals.py answers
    if body.explain:  # the fast lane leaves these to this route
        answer = json.loads(content)
        answer["explanations"] = await _explain(request, target, body.inputs, None, EXPLAIN_STEPS)
        content = json.dumps(answer).encode()
    return Response(content, media_type="application/json")


EXPLAIN_STEPS = 64  # integration steps of "explain": true on predict (ExplainRequest's default)
EXPLAIN_QUEUE = 8  # tenants with an explanation queued or running, at most


@router.post("/{name}/explain", response_model=ExplainResponse)
async def explain(
    request: Request, body: ExplainRequest, target: PredictTargetDep, service: PredictServiceDep
) -> ExplainResponse:
    """Per-word attributions of each input's predicted label (or of ``label``).

    Integrated gradients on the input embeddings (occlusion for int8 models): the
    attributions of an input sum to ``score - baseline_score`` up to ``delta``. A key with
    the predict scope may ask; the model is resolved as for predictions.
    """
    service.check_inputs(body.inputs)
    found = await _explain(request, target, body.inputs, body.label, body.steps)
    served = target.served
    return ExplainResponse.model_validate(
        {"model": served.name, "version": served.version, "explanations": found}
    )


async def _explain(
    request: Request, target: PredictTarget, texts: list[str], label: str | None, steps: int
) -> list[dict[str, object]]:
    """Explanations as plain data, computed off the event loop, one request at a time
    (each costs ``steps`` forward and backward passes)."""
    from serving.runtime.explain import explain as attributions

    served = target.served
    state = request.app.state
    if getattr(state, "explain_slot", None) is None:
        state.explain_slot = asyncio.Semaphore(1)
        state.explain_tenants = set()
    tenant = target.caller.tenant.id
    # One explanation queued or running per tenant, and a bounded queue: a tenant cannot
    # make another wait behind more than one request of its own.
    if tenant in state.explain_tenants:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            "This tenant already has an explanation in progress; retry when it is answered.",
            headers={"Retry-After": "1"},
        )
    if len(state.explain_tenants) >= EXPLAIN_QUEUE:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            f"{EXPLAIN_QUEUE} explanations are waiting; retry shortly.",
            headers={"Retry-After": "2"},
        )
    state.explain_tenants.add(tenant)
    try:
        async with state.explain_slot:
            found = await run_in_threadpool(
                functools.partial(
                    attributions,
                    served.model,
                    served.spec,
                    texts,
                    label=label,
                    steps=steps,
                    quantized=served.quantize is not None,
                )
            )
    except ValueError as exc:  # a label the model does not have
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    finally:
        state.explain_tenants.discard(tenant)
    return [dataclasses.asdict(e) for e in found]
