"""The one place where domain refusals become protocol statuses.

The predict service and the routes raise a ``Refusal`` (or a domain error that
``refusal_for`` turns into one); each protocol adapter answers it through this module
only, so a refusal has one status family and one message on /v1 REST, /v2 REST (the
Open Inference Protocol) and gRPC:

- /v1: ``{"detail": message}`` with the refusal's status (``v1_response``, and the
  exception handler ``add_refusal_handler`` installs for routes and dependencies);
- /v2: ``{"error": message}``, a limit's 422 as the protocol's 400 (``v2_response``);
- gRPC: the status code of ``grpc_code`` (401 UNAUTHENTICATED, 403 PERMISSION_DENIED,
  404 NOT_FOUND, 409 FAILED_PRECONDITION, 400/422 INVALID_ARGUMENT, 413/429
  RESOURCE_EXHAUSTED, 503 UNAVAILABLE, anything else INTERNAL).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse

from privacy.budget import BudgetError
from privacy.node_proof import ProofError
from serving.node_enrollment import EnrollmentError
from serving.runtime.batching import InputRejected
from serving.runtime.model_cache import ModelLoadError, NotDeployed
from tenancy.errors import Conflict, InvalidInput, NotFound
from tenancy.registry import UntrustedDeployment

if TYPE_CHECKING:  # grpc is imported where a gRPC server runs only
    import grpc


class Refusal(Exception):
    """Why a request is not answered: an HTTP status, a message, headers (the edge's reply)."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers


def unauthorized() -> Refusal:
    return Refusal(
        401, "Missing, invalid, revoked or expired API key.", {"WWW-Authenticate": "Bearer"}
    )


_LOAD_FAILED = {
    "integrity": "The stored model failed its integrity check; the operator has been alerted.",
    "decryption": "The stored model failed its integrity check; the operator has been alerted.",
    "missing": "The stored model is missing; the operator has been alerted.",
    "format": "The stored model cannot be rebuilt; the operator has been alerted.",
    "encoder": "This server's sentence encoder is not the one the model was trained with "
    "(its files or its runtime variant differ); the operator has been alerted.",
}


# First match wins: NotDeployed is a NotFound that is a 409.
_STATUSES: tuple[tuple[tuple[type[Exception], ...], int], ...] = (
    # The model exists, nothing of it is deployed; a deployment failed its signature check;
    # a write that conflicts (a name taken, a limit reached).
    ((NotDeployed, UntrustedDeployment, Conflict), 409),
    ((NotFound,), 404),  # UnknownModel too: another tenant's model looks the same
    # A request's own input (InputRejected: others in its batch ran).
    ((InvalidInput, BudgetError, ProofError, EnrollmentError, InputRejected), 422),
)


def refusal_for(exc: Exception, detail: str | None = None) -> Refusal:
    """The refusal of a domain error of the runtime or tenancy (``detail``: another message).

    Raises ``exc`` again when it is no refusal (a server fault).
    """
    if isinstance(exc, Refusal):
        return exc
    if isinstance(exc, ModelLoadError):  # never key material nor request content
        return Refusal(500, detail or _LOAD_FAILED[exc.reason])
    for kinds, status in _STATUSES:
        if isinstance(exc, kinds):
            return Refusal(status, detail or str(exc))
    raise exc


# ------------------------------------------------------------------ the protocols' forms


def v1_response(refusal: Refusal) -> JSONResponse:
    """/v1's answer: FastAPI's HTTPException form (the fast lane answers the same)."""
    return JSONResponse({"detail": refusal.detail}, refusal.status, headers=refusal.headers)


def v2_status(refusal: Refusal) -> int:
    # The Open Inference Protocol's client errors are 400s: a limit's 422 is one there.
    return 400 if refusal.status == 422 else refusal.status


def v2_response(refusal: Refusal) -> JSONResponse:
    """/v2's answer: the protocol's error object ``{"error": message}``."""
    return JSONResponse({"error": refusal.detail}, v2_status(refusal), headers=refusal.headers)


_GRPC_CODES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "FAILED_PRECONDITION",
    413: "RESOURCE_EXHAUSTED",
    422: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    503: "UNAVAILABLE",
}


def grpc_code(refusal: Refusal) -> grpc.StatusCode:
    """gRPC's status code for ``refusal`` (INTERNAL for a server fault)."""
    import grpc

    return grpc.StatusCode[_GRPC_CODES.get(refusal.status, "INTERNAL")]


async def _refused(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Refusal)
    return v1_response(exc)


def add_refusal_handler(app: FastAPI) -> None:
    """A Refusal raised by a /v1 route or dependency is answered as ``v1_response`` says."""
    app.add_exception_handler(Refusal, _refused)
