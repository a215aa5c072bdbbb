"""FastAPI dependencies as Annotated aliases: a route's signature says what it needs."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session

from serving.config import ServingConfig
from serving.fastlane import warm_target
from serving.launcher import RunLauncher
from serving.lookups import Caller, PredictLookups
from serving.metrics import ServingMetrics
from serving.registry import (
    ModelCache,
    ModelLoadError,
    NotDeployed,
    ServedModel,
    UnknownModel,
)
from tenancy.platform import Platform
from tenancy.tenants import Scope, authenticate, has_scope

_bearer = HTTPBearer(auto_error=False)
log = logging.getLogger("fedtext.serving")

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


async def get_lookups(request: Request) -> PredictLookups:
    lookups: PredictLookups = request.app.state.lookups
    return lookups


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


PlatformDep = Annotated[Platform, Depends(get_platform)]
ConfigDep = Annotated[ServingConfig, Depends(get_config)]
CacheDep = Annotated[ModelCache, Depends(get_cache)]
MetricsDep = Annotated[ServingMetrics, Depends(get_metrics)]
LookupsDep = Annotated[PredictLookups, Depends(get_lookups)]
SessionDep = Annotated[Session, Depends(get_session)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]

_UNAUTHORIZED = HTTPException(
    status_code=status.HTTP_401_UNAUTHORIZED,
    detail="Missing, invalid, revoked or expired API key.",
    headers={"WWW-Authenticate": "Bearer"},
)


def _authenticate(session: Session, credentials: HTTPAuthorizationCredentials | None) -> Caller:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise _UNAUTHORIZED
    found = authenticate(session=session, presented=credentials.credentials)
    if found is None:
        raise _UNAUTHORIZED
    return Caller(*found)


def get_caller(session: SessionDep, credentials: Credentials) -> Caller:
    """The tenant comes from the credential only, never from the request."""
    return _authenticate(session, credentials)


def _check_scope(caller: Caller, scope: Scope) -> Caller:
    if not has_scope(caller.key, scope):
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"This key lacks the {scope} scope.")
    return caller


def _require(scope: Scope):  # type: ignore[no-untyped-def]
    async def check(caller: Annotated[Caller, Depends(get_caller)]) -> Caller:
        return _check_scope(caller, scope)

    return check


@dataclass(frozen=True)
class PredictTarget:
    caller: Caller
    served: ServedModel


_LOAD_FAILED = {
    "integrity": "The stored model failed its integrity check; the operator has been alerted.",
    "decryption": "The stored model failed its integrity check; the operator has been alerted.",
    "missing": "The stored model is missing; the operator has been alerted.",
    "format": "The stored model cannot be rebuilt; the operator has been alerted.",
    "encoder": "This server's sentence encoder is not the one the model was trained with "
    "(its files differ); the operator has been alerted.",
}


async def get_predict_target(
    name: str,
    platform: PlatformDep,
    cache: CacheDep,
    lookups: LookupsDep,
    credentials: Credentials,
) -> PredictTarget:
    """Authenticate, check the scope and find the deployed model.

    On the event loop when the memo knows the caller and the deployed version and the model
    is in memory (the steady state); otherwise one thread hop does all the database work.
    """
    if credentials is not None and credentials.scheme.lower() == "bearer":
        warm = warm_target(lookups, cache, credentials.credentials, name)
        if warm is not None:
            return PredictTarget(*warm)
    return await run_in_threadpool(
        _find_predict_target, name, platform, cache, lookups, credentials
    )


def _find_predict_target(
    name: str,
    platform: Platform,
    cache: ModelCache,
    lookups: PredictLookups,
    credentials: HTTPAuthorizationCredentials | None,
) -> PredictTarget:
    """The predict path's database work (loading the model if needed), in a worker thread.

    The session is closed before the request waits in a batch, so a parked request never
    holds a pooled connection (64 waiting requests could otherwise hold the pool while the
    threads that would release it wait for a connection).
    """
    generation = lookups.generation
    with Session(platform.engine, expire_on_commit=False) as session:
        caller = _check_scope(_authenticate(session, credentials), Scope.predict)
        assert credentials is not None  # _authenticate refused a missing credential
        lookups.put_caller(credentials.credentials, caller.key, caller.tenant, generation)
        try:
            served, row = cache.get_deployed(session, caller.tenant.id, name)
        except UnknownModel as exc:
            # Another tenant's model and a missing one look the same: 404.
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
        except NotDeployed as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        except ModelLoadError as exc:
            # The reason and the blob's identity; never key material nor request content.
            log.error(
                "stored model failed to load",
                extra={
                    "fields": {
                        "tenant": caller.tenant.id,
                        "model": name,
                        "reason": exc.reason,
                        "detail": str(exc),
                    }
                },
            )
            raise HTTPException(
                status.HTTP_500_INTERNAL_SERVER_ERROR, _LOAD_FAILED[exc.reason]
            ) from None
        lookups.put_deployed(row, generation)
    return PredictTarget(caller, served)


def require_operator(config: ConfigDep, credentials: Credentials) -> None:
    if config.operator_token is None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, "No operator token is configured on this server."
        )
    if credentials is None or not hmac.compare_digest(
        credentials.credentials.encode(), config.operator_token.encode()
    ):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "Missing or invalid operator token.",
            headers={"WWW-Authenticate": "Bearer"},
        )


AdminCaller = Annotated[Caller, Depends(_require(Scope.admin))]
PredictCaller = Annotated[Caller, Depends(_require(Scope.predict))]
PredictTargetDep = Annotated[PredictTarget, Depends(get_predict_target)]
Operator = Annotated[None, Depends(require_operator)]
RunLauncherDep = Annotated[RunLauncher, Depends(get_run_launcher)]
OptionalRunLauncherDep = Annotated[RunLauncher | None, Depends(get_optional_run_launcher)]
