"""A federation node's proof of identity in its discovery reply.

The coordinator's QUERY carries a fresh random nonce and the platform run id. A node signs
``(nonce, run id, its node id, the tenant it serves, the dataset it declares, its
training-example count)`` with its node key: the same ECDSA P-384 OpenSSH key it
authenticates to the SuperLink with (``--auth-supernode-private-key``). The coordinator
verifies the signature against the public key Flower authenticated for that node id and
takes the node's tenant from the tenant that key is enrolled for (``tenancy.nodes``),
never from the reply. A reply signed for another nonce (a replay), another node, another
tenant or dataset, or under another key does not verify.

Shared by the node (``clients``) and the coordinator (``server``); cryptography only.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

DOMAIN = "fedtext-node-identity-v1"
NONCE_BYTES = 32


class ProofError(ValueError):
    """A key cannot be read or is not an ECDSA key; the message says which."""


def new_nonce() -> str:
    """A fresh random challenge (hex, 256 bits)."""
    return secrets.token_hex(NONCE_BYTES)


def proof_payload(
    *, nonce: str, run_id: str, node_id: int, tenant: str, dataset: str, num_train: int
) -> bytes:
    """The exact bytes a node signs: canonical JSON under a domain tag."""
    return json.dumps(
        {
            "domain": DOMAIN,
            "nonce": nonce,
            "run": run_id,
            "node": int(node_id),
            "tenant": tenant,
            "dataset": dataset,
            "num-train": int(num_train),
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()


def load_private_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    """The node's OpenSSH (or PEM) ECDSA private key."""
    data = Path(path).expanduser().read_bytes()
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError):
        try:
            key = serialization.load_pem_private_key(data, password=None)  # type: ignore[assignment]
        except (ValueError, TypeError):
            raise ProofError(f"{path} is not an unencrypted OpenSSH or PEM private key.") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ProofError(f"{path} is not an ECDSA private key.")
    return key


def sign_proof(key: ec.EllipticCurvePrivateKey, payload: bytes) -> str:
    """The signature (hex DER ECDSA over SHA-384) of ``payload``."""
    return key.sign(payload, ec.ECDSA(hashes.SHA384())).hex()


def load_public_key(data: bytes | str) -> ec.EllipticCurvePublicKey:
    """An ECDSA public key from OpenSSH (``node.pub``), PEM or DER SubjectPublicKeyInfo."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    text = raw.strip()
    try:
        if text.startswith(b"ecdsa-") or text.startswith(b"ssh-"):
            key = serialization.load_ssh_public_key(text)
        elif text.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(text)  # type: ignore[assignment]
        else:
            key = serialization.load_der_public_key(raw)  # type: ignore[assignment]
    except (ValueError, TypeError, IndexError):
        raise ProofError(
            "Not a public key (give the node's OpenSSH node.pub, or a PEM public key)."
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ProofError("Not an ECDSA public key; federation nodes use ECDSA P-384 keys.")
    return key


def fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """SHA-256 of the key's DER SubjectPublicKeyInfo, hex: one key, one fingerprint,
    whatever format (OpenSSH, PEM) it came in."""
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def openssh_text(key: ec.EllipticCurvePublicKey) -> str:
    """The key as one OpenSSH line (how it is stored and shown)."""
    return key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()


def verify_proof(key: ec.EllipticCurvePublicKey, payload: bytes, signature: str) -> bool:
    """True only when ``signature`` is ``key``'s signature of ``payload``."""
    try:
        key.verify(bytes.fromhex(signature), payload, ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError):
        return False
    return True
