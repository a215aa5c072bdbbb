"""FastAPI dependencies as Annotated aliases: a route's signature says what it needs."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request, status
from fastapi.security import HTTPBearer
from sqlmodel import Session

from serving.config import ServingConfig
from serving.credentials import RepeatedAuthorization, note_authenticated, request_credential
from serving.launcher import RunLauncher
from serving.metrics import ServingMetrics
from serving.predict import PredictService, PredictTarget, authenticate_caller, require_scope
from serving.runtime.lookups import Caller
from serving.runtime.model_cache import ModelCache
from tenancy.platform import Platform
from tenancy.tenants import Scope


class _Bearer(HTTPBearer):
    """The credential of ``Authorization: Bearer``, read by the one parser every path uses;
    an HTTPBearer still, so /openapi.json declares the scheme."""

    async def __call__(self, request: Request) -> str | None:  # type: ignore[override]
        try:
            return request_credential(request.scope)
        except RepeatedAuthorization as exc:  # CredentialMiddleware answers these first
            raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from None


_bearer = _Bearer(scheme_name="HTTPBearer", auto_error=False)

# Dependencies that do no I/O are ``async def``: FastAPI runs every plain ``def`` dependency
# in its thread pool, and on the predict path those hops cost more than the work itself.


async def get_platform(request: Request) -> Platform:
    platform: Platform = request.app.state.platform
    return platform


async def get_config(request: Request) -> ServingConfig:
    config: ServingConfig = request.app.state.config
    return config


async def get_cache(request: Request) -> ModelCache:
    cache: ModelCache = request.app.state.cache
    return cache


async def get_predict_service(request: Request) -> PredictService:
    service: PredictService = request.app.state.predict
    return service


async def get_metrics(request: Request) -> ServingMetrics:
    metrics: ServingMetrics = request.app.state.metrics
    return metrics


async def get_optional_run_launcher(request: Request) -> RunLauncher | None:
    launcher: RunLauncher | None = request.app.state.run_launcher
    return launcher


async def get_run_launcher(request: Request) -> RunLauncher:
    launcher = await get_optional_run_launcher(request)
    if launcher is None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, "This server starts no training runs."
        )
    return launcher


def get_session(platform: Annotated[Platform, Depends(get_platform)]) -> Iterator[Session]:
    with Session(platform.engine, expire_on_commit=False) as session:
        yield session


# Versions are BIGINT columns: a larger number is a 422 here, not an overflow in the driver.
MAX_VERSION = 2**63 - 1
VersionPath = Annotated[int, Path(ge=1, le=MAX_VERSION, description="A model version number.")]

PlatformDep = Annotated[Platform, Depends(get_platform)]
ConfigDep = Annotated[ServingConfig, Depends(get_config)]
CacheDep = Annotated[ModelCache, Depends(get_cache)]
MetricsDep = Annotated[ServingMetrics, Depends(get_metrics)]
SessionDep = Annotated[Session, Depends(get_session)]
PredictServiceDep = Annotated[PredictService, Depends(get_predict_service)]
Credential = Annotated[str | None, Depends(_bearer)]


def get_caller(session: SessionDep, credential: Credential) -> Caller:
    """The tenant comes from the credential only, never from the request (a Refusal is
    answered by serving/refusals.py's handler, as every route's)."""
    return authenticate_caller(session, credential)


def _require(scope: Scope):  # type: ignore[no-untyped-def]
    async def check(caller: Annotated[Caller, Depends(get_caller)]) -> Caller:
        return require_scope(caller, scope)

    return check


async def get_predict_target(
    name: str, service: PredictServiceDep, credential: Credential
) -> PredictTarget:
    """Authenticate, check the scope and find the deployed model (the predict service's
    ``resolve``: on the event loop when warm, else one thread hop)."""
    return await service.resolve(credential, name)


def require_operator(config: ConfigDep, credential: Credential) -> None:
    if config.operator_token is None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, "No operator token is configured on this server."
        )
    if credential is None or not hmac.compare_digest(
        credential.encode(), config.operator_token.encode()
    ):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "Missing or invalid operator token.",
            headers={"WWW-Authenticate": "Bearer"},
        )
    note_authenticated()


AdminCaller = Annotated[Caller, Depends(_require(Scope.admin))]
PredictCaller = Annotated[Caller, Depends(_require(Scope.predict))]
PredictTargetDep = Annotated[PredictTarget, Depends(get_predict_target)]
Operator = Annotated[None, Depends(require_operator)]
RunLauncherDep = Annotated[RunLauncher, Depends(get_run_launcher)]
OptionalRunLauncherDep = Annotated[RunLauncher | None, Depends(get_optional_run_launcher)]
