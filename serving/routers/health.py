from __future__ import annotations

from fastapi import APIRouter, HTTPException, status
from sqlalchemy import text

from serving.deps import PlatformDep
from tenancy.errors import KeyProviderError

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(platform: PlatformDep) -> dict[str, str]:
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
