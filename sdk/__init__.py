"""The fedtext Python SDK: ``Client`` (sync) and ``AsyncClient`` on httpx.

>>> from sdk import Client
>>> with Client("http://127.0.0.1:8000", key) as api:            # doctest: +SKIP
...     api.predict("sentiment", ["lovely crew"], top_k=3).predictions

Results are the API's own response models (serving/schemas.py); refusals raise
``ApiError`` subclasses with ``status`` and ``message``; 429 is retried, and 503 for
calls safe to send twice (not creating a tenant, key or run, nor a rollback), with
backoff, never sooner than ``Retry-After`` (``RetryPolicy``). Transport failures
(refused connection, timeout) are httpx's own exceptions and are not retried.
"""

from typing import TYPE_CHECKING, Any

from sdk._core import (
    ApiError,
    BadRequest,
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    RetryPolicy,
    ServerError,
    Unauthorized,
    Unavailable,
)
from sdk.sync import Client

if TYPE_CHECKING:
    from sdk.aio import AsyncClient


def __getattr__(name: str) -> Any:
    # AsyncClient loads asyncio: only for those who use it (start-up, bench/startup.py).
    if name == "AsyncClient":
        from sdk.aio import AsyncClient

        return AsyncClient
    raise AttributeError(f"module 'sdk' has no attribute {name!r}")


__all__ = [
    "ApiError",
    "AsyncClient",
    "BadRequest",
    "Client",
    "Conflict",
    "Forbidden",
    "InvalidRequest",
    "NotFound",
    "PayloadTooLarge",
    "RateLimited",
    "RetryPolicy",
    "ServerError",
    "Unauthorized",
    "Unavailable",
]
