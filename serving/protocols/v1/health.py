"""Liveness and readiness (no credentials), and Prometheus metrics (the operator token:
request counts, latencies and cache sizes describe every tenant's traffic)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Response, status
from sqlalchemy import text

from serving.metrics import CONTENT_TYPE_LATEST
from serving.protocols.v1.deps import MetricsDep, Operator, PlatformDep
from tenancy.errors import KeyProviderError

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=dict[str, str])
def healthz() -> dict[str, str]:
    """The process answers (it may still lack its database or keys: see /readyz)."""
    return {"status": "ok"}


@router.get("/readyz", response_model=dict[str, str])
def readyz(platform: PlatformDep) -> dict[str, str]:
    """Ready when the database answers and the key provider yields the key-encryption key."""
    try:
        with platform.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "database unreachable") from exc
    try:
        platform.keyring.provider.check()
    except KeyProviderError as exc:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, "key provider unavailable"
        ) from exc
    return {"status": "ready"}


@router.get("/metrics", response_class=Response)
def metrics(registry: MetricsDep, _operator: Operator) -> Response:
    """Prometheus text format: requests, latency, batch sizes, model cache and loads.

    Behind the operator token (a scraper sends it as a bearer token)."""
    body = registry.render()  # a plain def: FastAPI runs it in its thread pool
    return Response(content=body, media_type=CONTENT_TYPE_LATEST)
