"""Enrollment requests: a node proves it holds the private key it asks to enroll.

Public keys are public: without a proof, a partner could enroll another tenant's node key
for itself first (the tenant's own enrollment would then be refused: a denial of service).
A request is written at the node's site by ``fedtext federation enrollment-request``: the
node's SuperNode key (ECDSA P-384, the key it authenticates to the SuperLink with) signs
(tenant, key fingerprint, time, nonce) under a domain tag. Whoever enrolls it
(``fedtext federation enroll``, ``POST /v1/federation/nodes``) checks the signature under
the key in the request and that the request names the tenant it is enrolled for: a
captured request enrolls its key for its own tenant only, never for the one who replays it.

A proven enrollment takes a key over from an unproven one held by another tenant
(``tenancy.nodes.enroll_node_key``): a plain public-key enrollment still works (backward
compatible), it just cannot squat a key whose holder proves it.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from privacy.node_proof import (
    ProofError,
    fingerprint,
    load_public_key,
    openssh_text,
    sign_proof,
    verify_proof,
)

FORMAT = "fedtext-node-enrollment/1"
DOMAIN = "fedtext-node-enrollment-v1"
# A request is good for this long (a stale one is refused: write a fresh one), and may be
# dated at most this far ahead (clock skew between the site and the platform).
MAX_AGE = timedelta(days=30)
MAX_SKEW = timedelta(minutes=10)


class EnrollmentError(ValueError):
    """A request that cannot be believed; the message says why (for the person enrolling)."""


@dataclass(frozen=True)
class ProvenKey:
    """A key whose holder signed a request to enroll it for ``tenant``."""

    tenant: str
    fingerprint: str
    public_key: str  # OpenSSH one line


def _payload(tenant: str, fp: str, created_at: str, nonce: str) -> bytes:
    body = {"domain": DOMAIN, "tenant": tenant, "key": fp, "at": created_at, "nonce": nonce}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def make_request(
    key: ec.EllipticCurvePrivateKey, tenant: str, now: datetime | None = None
) -> dict[str, str]:
    """The signed request a node's site hands to the operator or its tenant's admin."""
    public = key.public_key()
    fp = fingerprint(public)
    at = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0).isoformat()
    nonce = secrets.token_hex(16)
    return {
        "format": FORMAT,
        "tenant": tenant,
        "public_key": openssh_text(public),
        "created_at": at,
        "nonce": nonce,
        "signature": sign_proof(key, _payload(tenant, fp, at, nonce)),
    }


def check_request(request: Any, *, tenant: str, now: datetime | None = None) -> ProvenKey:
    """The key a request proves for ``tenant``; EnrollmentError saying why not."""
    if not isinstance(request, dict) or request.get("format") != FORMAT:
        raise EnrollmentError(f"Not an enrollment request ({FORMAT}).")
    fields = ("tenant", "public_key", "created_at", "nonce", "signature")
    if not all(isinstance(request.get(f), str) and request[f] for f in fields):
        raise EnrollmentError(f"An enrollment request needs {', '.join(fields)}.")
    if request["tenant"] != tenant:
        # Said plainly: the request is the caller's own input, nothing of another tenant's.
        raise EnrollmentError(
            f"This enrollment request is for tenant {request['tenant']!r}, not {tenant!r}: "
            "write one for this tenant at the node's site."
        )
    try:
        key = load_public_key(request["public_key"])
        at = datetime.fromisoformat(request["created_at"])
    except ProofError as exc:
        raise EnrollmentError(str(exc)) from None
    except ValueError:
        raise EnrollmentError("created_at is not an ISO 8601 time.") from None
    if at.tzinfo is None:
        raise EnrollmentError("created_at has no time zone.")
    now = now or datetime.now(UTC)
    if at > now + MAX_SKEW or now - at > MAX_AGE:
        raise EnrollmentError(
            f"This enrollment request is dated {request['created_at']}: older than "
            f"{MAX_AGE.days} days or in the future. Write a fresh one."
        )
    fp = fingerprint(key)
    payload = _payload(tenant, fp, request["created_at"], request["nonce"])
    if not verify_proof(key, payload, request["signature"]):
        raise EnrollmentError(
            "The enrollment request's signature does not verify under its public key: it "
            "was not signed by that key's holder, or it was changed."
        )
    return ProvenKey(tenant, fp, openssh_text(key))
