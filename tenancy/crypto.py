"""All ``cryptography`` hazmat use lives here: AES-256-GCM with associated data."""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tenancy.errors import DecryptionError

KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # 96-bit nonce, fresh per encryption
FORMAT_V1 = b"FTX1"  # blob header: lets a reader refuse a foreign file before trying keys


def generate_key() -> bytes:
    return AESGCM.generate_key(bit_length=KEY_BYTES * 8)


def derive_key(master: bytes, purpose: str) -> bytes:
    """A 256-bit key for one purpose from ``master`` (HKDF-SHA256); purposes never share keys."""
    _check_key(master)
    return HKDF(
        algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=purpose.encode()
    ).derive(master)


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ValueError("An AES-256 key should be 32 bytes.")


def encrypt(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """``FTX1 || nonce || ciphertext+tag``; the associated data is bound, not stored."""
    _check_key(key)
    nonce = os.urandom(NONCE_BYTES)
    return FORMAT_V1 + nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def decrypt(key: bytes, blob: bytes, associated_data: bytes, what: str = "blob") -> bytes:
    """Inverse of :func:`encrypt`; any tampering or mismatch raises DecryptionError."""
    _check_key(key)
    header = len(FORMAT_V1)
    if len(blob) < header + NONCE_BYTES + 16 or not blob.startswith(FORMAT_V1):
        raise DecryptionError(f"The {what} is not a fedtext ciphertext (bad header or too short).")
    nonce = blob[header : header + NONCE_BYTES]
    try:
        return AESGCM(key).decrypt(nonce, blob[header + NONCE_BYTES :], associated_data)
    except InvalidTag:
        raise DecryptionError(
            f"The {what} failed authentication: it was altered, or it belongs to another "
            "tenant, model or version, or the key is wrong."
        ) from None
