"""Liveness, readiness and Prometheus metrics (no credentials: nothing tenant-specific here)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Response, status
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from serving.deps import MetricsDep, PlatformDep
from serving.metrics import CONTENT_TYPE_LATEST
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
async def metrics(registry: MetricsDep) -> Response:
    """Prometheus text format: requests, latency, batch sizes, model cache and loads."""
    body = await run_in_threadpool(registry.render)
    return Response(content=body, media_type=CONTENT_TYPE_LATEST)
