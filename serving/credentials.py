"""The one reader of a request's credential: ``Authorization: Bearer <credential>``.

Every path (the rate limiter, the predict fast lane, FastAPI's dependencies, the Open
Inference adapters) asks ``request_credential`` for the credential of an ASGI request,
so no two layers can read different headers. A request with more than one
``Authorization`` header has no credential at all: ``CredentialMiddleware`` answers it
400 before any layer looks at it (two headers let a limiter and a route disagree on who
is asking).
"""

from __future__ import annotations

import json
from contextvars import ContextVar, Token
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

_CACHE = "fedtext.credential"  # the parsed credential, kept in the ASGI scope


@dataclass
class Authentication:
    """Whether the code that checks credentials accepted this request's (see below)."""

    succeeded: bool = False


# Set per request by the rate limiter; the code that authenticates a credential (the
# tenancy lookup, the predict memo, the operator check) says so through
# ``note_authenticated``. A holder object, so that a dependency run in a worker thread
# (with a copy of the context) marks the same request.
_authentication: ContextVar[Authentication | None] = ContextVar(
    "fedtext_authentication", default=None
)


def note_authenticated() -> None:
    """Record that this request's credential authenticated (no-op outside a request)."""
    holder = _authentication.get()
    if holder is not None:
        holder.succeeded = True


def watch_authentication() -> tuple[Authentication, Token[Authentication | None]]:
    """A fresh holder for the current request; reset the token when the request is done."""
    holder = Authentication()
    return holder, _authentication.set(holder)


def stop_watching(token: Token[Authentication | None]) -> None:
    _authentication.reset(token)


class RepeatedAuthorization(ValueError):
    """A request carried several ``Authorization`` headers (refused: 400)."""

    detail = "A request may carry one Authorization header; this one has several."


def bearer_credential(authorization: str | None) -> str | None:
    """The credential in an ``Authorization: Bearer <credential>`` header value, else None.

    The scheme is case-insensitive (RFC 9110), so ``bearer``, ``Bearer`` and ``BEARER``
    name the same credential (and the same rate-limit bucket).
    """
    if not authorization:
        return None
    scheme, _, credential = authorization.partition(" ")
    credential = credential.strip()
    if not credential or scheme.lower() != "bearer":
        return None
    return credential


def authorization_header(scope: Scope) -> str | None:
    """The one ``Authorization`` header value of an ASGI request, or None.

    Raises
    ------
    RepeatedAuthorization
        If the header appears more than once.
    """
    found: str | None = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            if found is not None:
                raise RepeatedAuthorization(RepeatedAuthorization.detail)
            found = value.decode("latin-1")
    return found


def request_credential(scope: Scope) -> str | None:
    """The bearer credential of an ASGI request (parsed once, then read from the scope).

    Raises
    ------
    RepeatedAuthorization
        If the request has several ``Authorization`` headers.
    """
    if _CACHE not in scope:
        scope[_CACHE] = bearer_credential(authorization_header(scope))
    cached: str | None = scope[_CACHE]
    return cached


class CredentialMiddleware:
    """400 for a request with several ``Authorization`` headers, on every path."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            try:
                request_credential(scope)
            except RepeatedAuthorization as exc:
                body = json.dumps({"detail": str(exc)}).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 400,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
