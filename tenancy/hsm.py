"""A key provider whose key-encryption keys live in a PKCS#11 token (an HSM) and never leave it.

Each KEK version is two secret keys generated inside the token, marked sensitive and
non-extractable, found by label:

- ``<label>-v<n>``: AES-256, used only to encrypt and decrypt data keys inside the token
  (AES-GCM with the same associated data and ``FTX1 || nonce || ciphertext+tag`` format
  as the file provider, so a wrapped data key reads the same whichever provider made it);
- ``<label>-kdk-v<n>``: a 256-bit HMAC key from which platform keys (run checkpoints, the
  signing key of chain heads) are derived inside the token, HKDF-Expand style:
  ``HMAC-SHA256(kdk, purpose || 0x01)``.

The platform sees data keys and derived keys (as with any provider), never a KEK: a copy
of the data directory or of the database, without the token and its PIN, decrypts
nothing. Rotation adds version n+1 in the token; retiring a version destroys its keys.

Tested against SoftHSM2 (``tests/tenancy/test_hsm_keyring.py``); a production token (a
network HSM, a cloud HSM's PKCS#11 library) is used the same way, by module path, token
label and PIN.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pkcs11 import exceptions as pkcs11_errors

from tenancy import crypto
from tenancy.errors import DecryptionError, KeyProviderError
from tenancy.key_providers import KeyProvider

# Where Debian's and Ubuntu's softhsm2 package puts its module (tests, development).
SOFTHSM2_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
_NONCE_BYTES = crypto.NONCE_BYTES
# Tries of a first KEK generation that meets another process's (tagged, see _generate).
_GENERATE_TRIES = 5


# A lost session (the HSM restarted, a network HSM reconnected): reopened once.
_SESSION_LOST: tuple[type[Exception], ...] = (
    pkcs11_errors.SessionHandleInvalid,
    pkcs11_errors.SessionClosed,
    pkcs11_errors.DeviceRemoved,
    pkcs11_errors.DeviceError,
    pkcs11_errors.TokenNotPresent,
    pkcs11_errors.UserNotLoggedIn,
)
# A ciphertext that does not authenticate (SoftHSM2 reports a bad GCM tag as
# CKR_GENERAL_ERROR, other tokens as CKR_ENCRYPTED_DATA_INVALID).
_BAD_CIPHERTEXT: tuple[type[Exception], ...] = (
    pkcs11_errors.GeneralError,
    pkcs11_errors.EncryptedDataInvalid,
    pkcs11_errors.EncryptedDataLenRange,
    pkcs11_errors.FunctionFailed,
)


@dataclass(frozen=True)
class Pkcs11Config:
    """How to reach the token: the vendor's module, the token's label, the user PIN."""

    module: str
    token_label: str
    pin: str = field(repr=False)  # never in a log line or a traceback
    key_label: str = "fedtext-kek"

    def __post_init__(self) -> None:
        if not self.module or not os.path.exists(self.module):
            raise ValueError(f"The PKCS#11 module {self.module!r} does not exist.")
        if not self.token_label:
            raise ValueError("A PKCS#11 token label is needed (FEDTEXT_PKCS11_TOKEN).")
        if not self.pin:
            raise ValueError("The token's user PIN is needed (FEDTEXT_PKCS11_PIN).")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.key_label):
            raise ValueError("The key label should be 1-64 letters, digits, '.', '_' or '-'.")


class Pkcs11KeyProvider(KeyProvider):
    """KEKs generated in, and used inside, a PKCS#11 token (see the module docstring)."""

    name = "pkcs11"

    def __init__(self, config: Pkcs11Config) -> None:
        self.config = config
        self._session: Any = None
        self._lock = threading.Lock()  # one PKCS#11 session, used by one thread at a time

    # ------------------------------------------------------------- session and objects

    def _open(self) -> Any:
        import pkcs11
        from pkcs11.exceptions import PKCS11Error

        if self._session is not None:
            return self._session
        try:
            lib = pkcs11.lib(self.config.module)
            try:
                token = lib.get_token(token_label=self.config.token_label)
            except pkcs11.NoSuchToken:
                lib.reinitialize()  # a token initialized after this process loaded the module
                token = lib.get_token(token_label=self.config.token_label)
            try:
                self._session = token.open(rw=True, user_pin=self.config.pin)
            except pkcs11.UserAlreadyLoggedIn:
                # Login is per process and token: another provider here has logged in.
                self._session = token.open(rw=True)
        except pkcs11.NoSuchToken:
            raise KeyProviderError(
                f"No PKCS#11 token labelled {self.config.token_label!r} in {self.config.module}."
            ) from None
        except pkcs11.PinIncorrect:
            raise KeyProviderError(
                f"The PIN of PKCS#11 token {self.config.token_label!r} was refused."
            ) from None
        except PKCS11Error as exc:
            raise KeyProviderError(f"The PKCS#11 token cannot be opened: {exc!r}") from None
        return self._session

    def _label(self, version: int, kind: str = "") -> str:
        return f"{self.config.key_label}-{kind}v{version}"

    def _find(self, version: int, kind: str = "") -> Any:
        import pkcs11
        from pkcs11 import Attribute, ObjectClass

        session = self._open()
        found = list(
            session.get_objects(
                {
                    Attribute.CLASS: ObjectClass.SECRET_KEY,
                    Attribute.LABEL: self._label(version, kind),
                }
            )
        )
        if not found:
            raise KeyProviderError(
                f"KEK version {version} is not in PKCS#11 token {self.config.token_label!r}."
            )
        if len(found) > 1:
            label = self._label(version, kind)
            raise KeyProviderError(
                f"Token {self.config.token_label!r} holds {len(found)} keys labelled {label!r}."
            )
        key = found[0]
        assert isinstance(key, pkcs11.SecretKey)
        return key

    def _labels(self) -> list[str]:
        from pkcs11 import Attribute, ObjectClass

        session = self._open()
        return [
            str(o[Attribute.LABEL])
            for o in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY})
        ]

    # ------------------------------------------------------------- versions

    def versions(self) -> list[int]:
        pattern = re.compile(re.escape(self.config.key_label) + r"-v([0-9]+)")
        with self._lock:
            found = sorted(
                {int(m.group(1)) for lb in self._labels() if (m := pattern.fullmatch(lb))}
            )
        return found

    def current_version(self) -> int:
        """The newest KEK version; on first use (no KEK in the token) version 1 is generated
        in the token, as the file provider creates its key file. Processes that start
        together on a fresh token (API replicas, a run worker) end up with one version 1."""
        for _ in range(_GENERATE_TRIES):
            found = self.versions()
            if found:
                return found[-1]
            if self._generate(1):
                return 1
            time.sleep(random.uniform(0.01, 0.2))  # both lost: let one of them win next time
        raise KeyProviderError(
            f"KEK version 1 could not be generated alone in token {self.config.token_label!r}."
        )

    def check(self) -> None:
        version = self.current_version()
        with self._lock:
            self._find(version)
            self._find(version, "kdk-")

    def add_version(self) -> int:
        """Generate KEK version n+1 (and its derivation key) inside the token."""
        found = self.versions()
        version = (found[-1] if found else 0) + 1
        if not self._generate(version):
            raise KeyProviderError(
                f"Another process generated KEK version {version} at the same time; "
                "try the rotation again."
            )
        return version

    def _generate(self, version: int, *, signing: bool = False) -> bool:
        """Generate ``version``'s two keys; True when they are the only keys of that version.

        PKCS#11 has no create-if-absent: two processes may generate the same version at
        once. Each pair is tagged (CKA_ID) and checked before any use; a pair that finds
        another is destroyed, so no data key is ever wrapped by a key that is then removed.
        """
        from pkcs11 import Attribute, KeyType, MechanismFlag, ObjectClass

        tag = os.urandom(16)
        secret = {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.MODIFIABLE: False,
        }
        kinds = {"": (KeyType.AES, MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT)}
        kinds["kdk-"] = (KeyType.GENERIC_SECRET, MechanismFlag.SIGN | MechanismFlag.VERIFY)
        if signing:  # a signing-key version: one derivation key, apart from the KEKs
            kinds = {"sign-": kinds["kdk-"]}
        with self._lock:
            session = self._open()
            for kind, (key_type, capabilities) in kinds.items():
                session.generate_key(
                    key_type,
                    256,
                    id=tag,
                    label=self._label(version, kind),
                    store=True,
                    capabilities=capabilities,
                    template=secret,
                )
            same = [
                obj
                for kind in kinds
                for obj in session.get_objects(
                    {
                        Attribute.CLASS: ObjectClass.SECRET_KEY,
                        Attribute.LABEL: self._label(version, kind),
                    }
                )
            ]
            if all(bytes(obj[Attribute.ID]) == tag for obj in same):
                return True
            for obj in same:
                if bytes(obj[Attribute.ID]) == tag:
                    obj.destroy()
            return False

    def retire_version(self, version: int) -> None:
        if version == self.current_version():
            raise KeyProviderError(f"KEK version {version} is current; it cannot be retired.")
        with self._lock:
            for kind in ("", "kdk-"):
                with contextlib.suppress(KeyProviderError):  # already gone
                    self._find(version, kind).destroy()

    # ------------------------------------------------------------- signing keys
    # Each signing-key version is a 256-bit HMAC key ``<label>-sign-v<n>`` in the token
    # (sensitive, non-extractable); the Ed25519 seed is derived from it inside the token.
    # A KEK rotation or retirement never touches these keys.

    def signing_versions(self) -> list[int]:
        pattern = re.compile(re.escape(self.config.key_label) + r"-sign-v([0-9]+)")
        for _ in range(_GENERATE_TRIES):
            with self._lock:
                found = sorted(
                    {int(m.group(1)) for lb in self._labels() if (m := pattern.fullmatch(lb))}
                )
            if found:
                return found
            if self._generate(1, signing=True):  # first use, as the KEK's version 1
                return [1]
            time.sleep(random.uniform(0.01, 0.2))
        raise KeyProviderError(
            f"Signing key version 1 could not be generated alone in token "
            f"{self.config.token_label!r}."
        )

    def signing_seed(self, version: int) -> bytes:
        from pkcs11 import Mechanism

        def mac() -> bytes:
            key = self._find(version, "sign-")
            return bytes(key.sign(b"fedtext:row-signing\x01", mechanism=Mechanism.SHA256_HMAC))

        return self._in_token(mac)

    def add_signing_version(self) -> int:
        version = self.signing_versions()[-1] + 1
        if not self._generate(version, signing=True):
            raise KeyProviderError(
                f"Another process generated signing key version {version} at the same time; "
                "try the rotation again."
            )
        return version

    # ------------------------------------------------------------- use, inside the token

    def get_kek(self, version: int) -> bytes:
        raise KeyProviderError("A PKCS#11 KEK never leaves its token; it wraps keys inside it.")

    def _in_token(self, operation: Callable[[], bytes]) -> bytes:
        """Run ``operation`` under the lock; a lost session is reopened once; any other
        token error (but a ciphertext that does not authenticate) is a KeyProviderError."""
        with self._lock:
            for attempt in (1, 2):
                try:
                    return operation()
                except _SESSION_LOST as exc:
                    self._session = None
                    if attempt == 2:
                        raise KeyProviderError(
                            f"The PKCS#11 token is unavailable: {exc!r}"
                        ) from None
                except pkcs11_errors.PKCS11Error as exc:
                    raise KeyProviderError(f"The PKCS#11 token refused: {exc!r}") from None
        raise AssertionError("unreachable")

    def wrap_key(self, version: int, key: bytes, associated_data: bytes) -> bytes:
        from pkcs11 import GCMParams, Mechanism

        nonce = os.urandom(_NONCE_BYTES)

        def seal() -> bytes:
            kek = self._find(version)
            return bytes(
                kek.encrypt(
                    key,
                    mechanism=Mechanism.AES_GCM,
                    mechanism_param=GCMParams(nonce, associated_data, 128),
                )
            )

        return crypto.FORMAT_V1 + nonce + self._in_token(seal)

    def unwrap_key(self, version: int, wrapped: bytes, associated_data: bytes) -> bytes:
        from pkcs11 import GCMParams, Mechanism

        header = len(crypto.FORMAT_V1)
        if len(wrapped) < header + _NONCE_BYTES + 16 or not wrapped.startswith(crypto.FORMAT_V1):
            raise DecryptionError("The wrapped data key is not a fedtext ciphertext.")
        nonce = wrapped[header : header + _NONCE_BYTES]

        def open_() -> bytes:
            kek = self._find(version)
            try:
                return bytes(
                    kek.decrypt(
                        wrapped[header + _NONCE_BYTES :],
                        mechanism=Mechanism.AES_GCM,
                        mechanism_param=GCMParams(nonce, associated_data, 128),
                    )
                )
            except _BAD_CIPHERTEXT:
                raise DecryptionError(
                    "The wrapped data key failed authentication in the token: it was altered, "
                    "belongs to another tenant, or was wrapped by another KEK."
                ) from None

        return self._in_token(open_)

    def derive_key(self, version: int, purpose: str) -> bytes:
        from pkcs11 import Mechanism

        def mac() -> bytes:
            kdk = self._find(version, "kdk-")
            return bytes(kdk.sign(purpose.encode() + b"\x01", mechanism=Mechanism.SHA256_HMAC))

        return self._in_token(mac)
