"""Request limits at the edge: body size (413) and a per-key rate limit (429 + Retry-After)."""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.predict import bearer_credential


@dataclass(frozen=True)
class Limits:
    # 64 inputs of 2000 characters, escaped as JSON, fit well under 1 MiB.
    max_body_bytes: int = 1 << 20
    # Per API key (or operator token): a token bucket of ``burst`` requests refilled at
    # ``rate_per_second``. None (the library default: tests, benchmarks) turns it off;
    # ``fedtext serve`` turns it on from FEDTEXT_RATE_LIMIT_PER_SECOND.
    rate_per_second: float | None = None
    burst: int = 100
    # Buckets kept in memory (least recently used go first): forged tokens cannot grow it.
    max_buckets: int = 10_000

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1:
            raise ValueError("max_body_bytes should be positive.")
        if self.rate_per_second is not None and self.rate_per_second <= 0:
            raise ValueError("rate_per_second should be positive (or None for no limit).")
        if self.burst < 1 or self.max_buckets < 1:
            raise ValueError("burst and max_buckets should be at least 1.")


async def send_json(
    send: Send, status: int, content: object, headers: dict[str, str] | None = None
) -> None:
    """A whole JSON response through a raw ASGI ``send``."""
    await send_bytes(send, status, json.dumps(content).encode(), headers)


async def send_bytes(
    send: Send, status: int, body: bytes, headers: dict[str, str] | None = None
) -> None:
    """A whole response of JSON ``body`` bytes through a raw ASGI ``send``."""
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def _send_json(send: Send, status: int, detail: str, headers: dict[str, str]) -> None:
    await send_json(send, status, {"detail": detail}, headers)


class BodySizeLimitMiddleware:
    """413 for a declared Content-Length over the limit, or a streamed body that passes it."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        detail = f"The request body exceeds the limit of {self.max} bytes."
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_json(send, 400, "Invalid Content-Length.", {})
                    return
                if declared > self.max:
                    await _send_json(send, 413, detail, {"Connection": "close"})
                    return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max:
                    # An HTTPException passes FastAPI's body parsing unchanged (any other
                    # error there becomes a 400).
                    raise HTTPException(413, detail)
            return message

        await self.app(scope, counted, send)


class TokenBuckets:
    """Thread-safe token buckets keyed by an opaque string, bounded in number (LRU)."""

    def __init__(self, rate: float, burst: int, max_buckets: int) -> None:
        self.rate, self.burst, self.max_buckets = rate, burst, max_buckets
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: str, now: float | None = None) -> float:
        """0 when a request may pass, else the seconds until one token is back."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.pop(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            wait = 0.0
            if tokens >= 1:
                tokens -= 1
            else:
                wait = (1 - tokens) / self.rate
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self.max_buckets:
                self._buckets.popitem(last=False)
            return wait


class RateLimitMiddleware:
    """429 with Retry-After when one credential sends faster than its bucket refills.

    The bucket is keyed by a hash of the whole presented credential (the bearer credential
    as every other path reads it, else the raw header), so a forged token that borrows a
    real key's prefix gets a bucket of its own and cannot starve the key. Requests without
    an Authorization header (health checks) are not limited here.
    """

    def __init__(self, app: ASGIApp, *, rate: float, burst: int, max_buckets: int) -> None:
        self.app = app
        self.rate = rate
        self.buckets = TokenBuckets(rate, burst, max_buckets)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == b"authorization":
                    credential = bearer_credential(value.decode("latin-1"))
                    presented = value if credential is None else credential.encode()
                    key = hashlib.sha256(presented).hexdigest()[:32]
                    wait = self.buckets.take(key)
                    if wait > 0:
                        retry = max(1, math.ceil(wait))
                        await _send_json(
                            send,
                            429,
                            f"Rate limit exceeded: {self.rate:g} requests per second per key; "
                            f"retry after {retry} s.",
                            {"Retry-After": str(retry)},
                        )
                        return
                    break
        await self.app(scope, receive, send)
