"""Request limits at the edge: body size (413), rate limits (429 + Retry-After), and the
connection-level limits ``fedtext serve`` applies (serving/connections.py)."""

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

from serving.credentials import request_credential, stop_watching, watch_authentication


@dataclass(frozen=True)
class Limits:
    """What one API process accepts from a client, at the HTTP and the connection level."""

    # 64 inputs of 2000 characters, escaped as JSON, fit well under 1 MiB.
    max_body_bytes: int = 1 << 20
    # Per API key (or operator token), once the credential has authenticated: a token
    # bucket of ``burst`` requests refilled at ``rate_per_second``. None (the library
    # default: tests, benchmarks) turns it off; ``fedtext serve`` turns it on from
    # FEDTEXT_RATE_LIMIT_PER_SECOND.
    rate_per_second: float | None = None
    burst: int = 100
    # Failed authentication (401), per client address: a credential that has not
    # authenticated is let through only while its address has failures left, so guessing
    # keys (each guess a database lookup) is slow whatever credentials are sent. None: off.
    failed_auth_per_second: float | None = None
    failed_auth_burst: int = 20
    # Buckets kept in memory (least recently used go first): forged tokens cannot grow it.
    max_buckets: int = 10_000
    # Connection-level limits (serving/connections.py; ``fedtext serve`` only): a request
    # head larger than this is refused 431; the head must arrive within
    # ``header_timeout_s`` and the body within ``body_timeout_s`` (else 408 and the
    # connection is closed); beyond ``max_connections`` open connections a new one gets 503.
    max_header_bytes: int = 16 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 1000

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1:
            raise ValueError("max_body_bytes should be positive.")
        for name in ("rate_per_second", "failed_auth_per_second"):
            rate = getattr(self, name)
            if rate is not None and not (math.isfinite(rate) and rate > 0):
                raise ValueError(f"{name} should be a positive number (or None for no limit).")
        if self.burst < 1 or self.failed_auth_burst < 1 or self.max_buckets < 1:
            raise ValueError("burst, failed_auth_burst and max_buckets should be at least 1.")
        if self.max_header_bytes < 1024:
            raise ValueError("max_header_bytes should be at least 1024.")
        if not (self.header_timeout_s > 0 and self.body_timeout_s > 0):
            raise ValueError("header_timeout_s and body_timeout_s should be positive.")
        if self.max_connections < 1:
            raise ValueError("max_connections should be at least 1.")


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

    def peek(self, key: str, now: float | None = None) -> float:
        """0 when ``key`` has a token left, else the seconds until one is back (takes none)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            return 0.0 if tokens >= 1 else (1 - tokens) / self.rate


def _client_address(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def _hashed(credential: str) -> str:
    return hashlib.sha256(credential.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Admission:
    """A request's standing with the rate limits (``RateGate.admit``)."""

    key: str | None  # a hash of the credential; None: no credential
    address: str
    known: bool  # the credential has authenticated in this process before
    refusal: tuple[str, int] | None = None  # (message, retry-after seconds): answer 429


class RateGate:
    """The rate-limit rules of every transport (HTTP below, gRPC in
    serving/protocols/oip/grpc_server.py).

    A credential that has authenticated in this process (the code that checks credentials
    said so through ``serving.credentials.note_authenticated``: a public route answering
    200 to a forged token does not count) is limited by a bucket of its own, keyed by a
    hash of the whole credential as the one parser reads it (serving/credentials.py: a
    forged token that borrows a real key's prefix is another credential, and
    ``bearer``/``Bearer`` are one). Any other request with a credential, and every 401,
    draws on the client address's failure bucket: once it is empty, unknown credentials
    from that address are refused before any database lookup, while keys that have
    authenticated keep their own limit (or none, when the per-key limit is off). Requests
    without a credential (health checks) are limited only by their 401s.
    """

    def __init__(
        self,
        *,
        rate: float | None,
        burst: int,
        max_buckets: int,
        failed_auth_rate: float | None = None,
        failed_auth_burst: int = 20,
    ) -> None:
        self.rate = rate
        self.buckets = TokenBuckets(rate, burst, max_buckets) if rate is not None else None
        self.failed_rate = failed_auth_rate
        self.failures = (
            TokenBuckets(failed_auth_rate, failed_auth_burst, max_buckets)
            if failed_auth_rate is not None
            else None
        )
        # Hashes of credentials that authenticated (bounded like the buckets).
        self.authenticated: OrderedDict[str, None] = OrderedDict()
        self.max_known = max_buckets
        self._lock = threading.Lock()

    @classmethod
    def from_limits(cls, limits: Limits) -> RateGate:
        return cls(
            rate=limits.rate_per_second,
            burst=limits.burst,
            max_buckets=limits.max_buckets,
            failed_auth_rate=limits.failed_auth_per_second,
            failed_auth_burst=limits.failed_auth_burst,
        )

    def _known(self, key: str) -> bool:
        with self._lock:
            if key in self.authenticated:
                self.authenticated.move_to_end(key)
                return True
            return False

    def admit(self, credential: str | None, address: str) -> Admission:
        """Whether a request may go on (before any database lookup)."""
        key = _hashed(credential) if credential is not None else None
        known = key is not None and self._known(key)
        refusal = None
        if known:
            assert key is not None
            wait = self.buckets.take(key) if self.buckets is not None else 0.0
            if wait > 0:
                retry = max(1, math.ceil(wait))
                refusal = (
                    f"Rate limit exceeded: {self.rate:g} requests per second per key; "
                    f"retry after {retry} s.",
                    retry,
                )
        elif key is not None and self.failures is not None:
            wait = self.failures.peek(address)
            if wait > 0:
                retry = max(1, math.ceil(wait))
                refusal = (
                    f"Too many failed authentications from this address: "
                    f"{self.failed_rate:g} per second; retry after {retry} s.",
                    retry,
                )
        return Admission(key, address, known, refusal)

    def answered(self, admission: Admission, status: int, authenticated: bool) -> None:
        """Record how an admitted request ended: its status, and whether the code that
        checks credentials accepted its credential."""
        key = admission.key
        if status == 401:
            if self.failures is not None:
                self.failures.take(admission.address)
            if key is not None:
                with self._lock:
                    self.authenticated.pop(key, None)
        elif key is not None and not admission.known and authenticated:
            # Its own bucket from now on, this request included.
            with self._lock:
                self.authenticated[key] = None
                while len(self.authenticated) > self.max_known:
                    self.authenticated.popitem(last=False)
            if self.buckets is not None:
                self.buckets.take(key)


class RateLimitMiddleware:
    """429 with Retry-After: per key once authenticated, per address for failed attempts
    (the rules are ``RateGate``'s).

    Behind a proxy every client has the proxy's address: run uvicorn with
    ``--forwarded-allow-ips`` for the proxy so the client's own address is used.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        rate: float | None,
        burst: int,
        max_buckets: int,
        failed_auth_rate: float | None = None,
        failed_auth_burst: int = 20,
    ) -> None:
        self.app = app
        self.gate = RateGate(
            rate=rate,
            burst=burst,
            max_buckets=max_buckets,
            failed_auth_rate=failed_auth_rate,
            failed_auth_burst=failed_auth_burst,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        admission = self.gate.admit(request_credential(scope), _client_address(scope))
        if admission.refusal is not None:
            detail, retry = admission.refusal
            await _send_json(send, 429, detail, {"Retry-After": str(retry)})
            return

        seen, token = watch_authentication()

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.gate.answered(admission, message["status"], seen.succeeded)
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            stop_watching(token)
