"""FastAPI dependencies as Annotated aliases: a route's signature says what it needs."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session

from serving.config import ServingConfig
from serving.registry import ModelCache
from tenancy.platform import Platform
from tenancy.tables import ApiKey, Tenant
from tenancy.tenants import Scope, authenticate, has_scope

_bearer = HTTPBearer(auto_error=False)


def get_platform(request: Request) -> Platform:
    platform: Platform = request.app.state.platform
    return platform


def get_config(request: Request) -> ServingConfig:
    config: ServingConfig = request.app.state.config
    return config


def get_cache(request: Request) -> ModelCache:
    cache: ModelCache = request.app.state.cache
    return cache


def get_session(platform: Annotated[Platform, Depends(get_platform)]) -> Iterator[Session]:
    with Session(platform.engine, expire_on_commit=False) as session:
        yield session


PlatformDep = Annotated[Platform, Depends(get_platform)]
ConfigDep = Annotated[ServingConfig, Depends(get_config)]
CacheDep = Annotated[ModelCache, Depends(get_cache)]
SessionDep = Annotated[Session, Depends(get_session)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]

_UNAUTHORIZED = HTTPException(
    status_code=status.HTTP_401_UNAUTHORIZED,
    detail="Missing, invalid, revoked or expired API key.",
    headers={"WWW-Authenticate": "Bearer"},
)


@dataclass(frozen=True)
class Caller:
    key: ApiKey
    tenant: Tenant


def get_caller(session: SessionDep, credentials: Credentials) -> Caller:
    """The tenant comes from the credential only, never from the request."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise _UNAUTHORIZED
    found = authenticate(session=session, presented=credentials.credentials)
    if found is None:
        raise _UNAUTHORIZED
    return Caller(*found)


def _require(scope: Scope):  # type: ignore[no-untyped-def]
    def check(caller: Annotated[Caller, Depends(get_caller)]) -> Caller:
        if not has_scope(caller.key, scope):
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"This key lacks the {scope} scope.")
        return caller

    return check


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
Operator = Annotated[None, Depends(require_operator)]
