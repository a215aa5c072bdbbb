"""What the sync and async clients share: the calls, their results, errors and retry policy.

Each API call is described once, as a ``Call`` (method, path, body, how to read the
answer); ``sdk.Client`` sends it with ``httpx.Client`` and
``sdk.AsyncClient`` with ``httpx.AsyncClient``. Results are the API's own
response models (serving/schemas.py), so a client and the server cannot disagree on a field.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any, Generic, TypeVar

import httpx
from pydantic import TypeAdapter

T = TypeVar("T")

# Statuses worth another try: the server asked us to slow down, or is briefly unable.
RETRY_STATUSES = frozenset({429, 503})
# Methods whose repetition does what one request does (RFC 9110 9.2.2).
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


class ApiError(Exception):
    """The API refused a request: ``status`` and the server's ``message``."""

    def __init__(self, status: int, message: str, response: httpx.Response | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.response = response


class BadRequest(ApiError):
    """400: the request is malformed (for example a bad tensor, or repeated credentials)."""


class Unauthorized(ApiError):
    """401: missing, invalid, revoked or expired key (or operator token)."""


class Forbidden(ApiError):
    """403: the key lacks the scope (admin, predict) the call needs."""


class NotFound(ApiError):
    """404: no such object for this tenant (another tenant's looks the same)."""


class Conflict(ApiError):
    """409: the object is not in a state that allows it (e.g. nothing deployed)."""


class PayloadTooLarge(ApiError):
    """413: the request body passes the server's limit."""


class InvalidRequest(ApiError):
    """422: the request names a limit or value the server does not accept."""


class RateLimited(ApiError):
    """429: too many requests; ``retry_after`` seconds until the next may pass."""

    def __init__(
        self,
        status: int,
        message: str,
        response: httpx.Response | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(status, message, response)
        self.retry_after = retry_after


class ServerError(ApiError):
    """5xx: the server failed; the message says whether the operator was alerted."""


class Unavailable(ServerError):
    """503: the server cannot do this now (no database, no run launcher, ...)."""


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: InvalidRequest,
    429: RateLimited,
    503: Unavailable,
}


def error_message(response: httpx.Response) -> str:
    """The server's message: ``detail`` (FastAPI), ``error`` (the inference protocol) or text."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return response.text or response.reason_phrase
    if isinstance(body, dict):
        detail = body.get("detail", body.get("error"))
        if isinstance(detail, str):
            return detail
        if isinstance(detail, list):  # FastAPI's validation errors
            return "; ".join(
                f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg', d)}"
                if isinstance(d, dict)
                else str(d)
                for d in detail
            )
    return response.text


def retry_after(response: httpx.Response) -> float | None:
    """Seconds from a ``Retry-After`` header (seconds or an HTTP date), else None."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(when.tzinfo)).total_seconds())


def raise_for(response: httpx.Response) -> None:
    """Raise the typed ``ApiError`` of a refused response; nothing for a 2xx."""
    if response.is_success:
        return
    status = response.status_code
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else ApiError)
    message = error_message(response)
    if cls is RateLimited:
        raise RateLimited(status, message, response, retry_after(response))
    raise cls(status, message, response)


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of 429 and 503: ``Retry-After`` when the server gives one, else exponential
    backoff with full jitter (``backoff * 2**attempt``, at most ``max_backoff``).

    A 429 is refused before the request is processed, so it is retried for every call. A
    503 may come from a proxy after the server acted, so it is retried only for calls
    whose repetition is harmless (reads, deletes, predict, explain, deploy), never for
    creating a tenant, key or run, nor for a rollback. A ``Retry-After`` longer than
    ``max_backoff`` is not cut short: the error is raised (``RateLimited.retry_after``
    says how long the server asked for).
    """

    max_retries: int = 3
    backoff: float = 0.5
    max_backoff: float = 30.0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries should be zero or positive.")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ValueError("backoff and max_backoff should be zero or positive.")

    def delay(
        self, response: httpx.Response, attempt: int, idempotent: bool = True
    ) -> float | None:
        """Seconds to wait before retrying ``response`` (None: do not retry)."""
        status = response.status_code
        if status not in RETRY_STATUSES or attempt >= self.max_retries:
            return None
        if status == 503 and not idempotent:
            return None
        asked = retry_after(response)
        if asked is not None:
            return asked if asked <= self.max_backoff else None
        return random.uniform(0, min(self.max_backoff, self.backoff * 2**attempt))


@dataclass(frozen=True)
class Call(Generic[T]):
    """One API request and how to read its answer."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    json: Any = None
    params: dict[str, Any] = field(default_factory=dict)
    # Whether sending it twice does what sending it once does (None: by its method).
    idempotent: bool | None = None

    @property
    def repeatable(self) -> bool:
        if self.idempotent is not None:
            return self.idempotent
        return self.method.upper() in IDEMPOTENT_METHODS


def model(tp: Any) -> Callable[[httpx.Response], Any]:
    """A parser of a JSON body into ``tp`` (a response model, or a list of them)."""
    adapter: TypeAdapter[Any] = TypeAdapter(tp)
    return lambda r: adapter.validate_json(r.content)


def raw(response: httpx.Response) -> bytes:
    return response.content
