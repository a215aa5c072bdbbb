"""Key-encryption-key providers held in software: the provider interface, a local key file
and an environment variable (the PKCS#11 provider is ``tenancy.hsm``; ``tenancy.keyring``
picks one by name)."""

from __future__ import annotations

import base64
import binascii
import json
import os
from abc import ABC, abstractmethod
from pathlib import Path

from tenancy import crypto
from tenancy.errors import KeyProviderError
from tenancy.files import make_private, private_dir

# What heads were signed with before v0006: a key derived from each KEK version.
LEGACY_HEAD_PURPOSE = "fedtext:ledger-head-signing"


class KeyProvider(ABC):
    """Source of versioned key-encryption keys."""

    name: str

    @abstractmethod
    def current_version(self) -> int: ...

    @abstractmethod
    def get_kek(self, version: int) -> bytes: ...

    def check(self) -> None:
        """Raise KeyProviderError when the current KEK is unreadable."""
        self.get_kek(self.current_version())

    def versions(self) -> list[int]:
        """Every KEK version this provider can still read."""
        return [self.current_version()]

    def add_version(self) -> int:
        """Make a new KEK version current (older ones stay readable); return its number."""
        raise KeyProviderError(f"The {self.name} key provider cannot rotate its KEK itself.")

    def retire_version(self, version: int) -> None:
        """Forget an old KEK version (the caller checks that nothing uses it)."""
        raise KeyProviderError(f"The {self.name} key provider cannot retire KEK versions.")

    # Providers that hold KEKs in software implement the three operations below with the
    # KEK's bytes; a provider whose KEKs never leave their device (tenancy/hsm.py)
    # overrides them and does each inside the device.

    def wrap_key(self, version: int, key: bytes, associated_data: bytes) -> bytes:
        """``key`` encrypted (AES-256-GCM) under KEK ``version`` with ``associated_data``."""
        return crypto.encrypt(self.get_kek(version), key, associated_data)

    def unwrap_key(self, version: int, wrapped: bytes, associated_data: bytes) -> bytes:
        """Inverse of :meth:`wrap_key`; DecryptionError on any mismatch."""
        return crypto.decrypt(
            self.get_kek(version), wrapped, associated_data, what="wrapped data key"
        )

    def derive_key(self, version: int, purpose: str) -> bytes:
        """A 256-bit key for ``purpose`` derived from KEK ``version`` (never the KEK itself)."""
        return crypto.derive_key(self.get_kek(version), purpose)

    # The platform's signing keys (tenancy/signing.py): Ed25519 seeds kept apart from the
    # KEK versions, so a KEK rotation never changes which key signed what. Each provider
    # keeps them where it keeps its KEKs (file: a file beside the KEK file; PKCS#11: in the
    # token; env: derived from the one KEK, which that provider never rotates).

    def signing_versions(self) -> list[int]:
        """Every signing-key version this provider can still sign with (oldest first)."""
        return [1]

    def signing_seed(self, version: int) -> bytes:
        """The 32-byte Ed25519 seed of signing-key ``version`` (never stored in the database)."""
        if version not in self.signing_versions():
            raise KeyProviderError(f"Signing key version {version} is not held by {self.name}.")
        return self.derive_key(1, f"fedtext:row-signing-v{version}")

    def add_signing_version(self) -> int:
        """Make a new signing-key version current; the older ones stay (they verify)."""
        raise KeyProviderError(
            f"The {self.name} key provider derives its one signing key from its KEK; "
            "it cannot add another."
        )

    def legacy_head_public_keys(self) -> list[bytes]:
        """Public keys of the head-signing keys derived from KEK versions before signing
        keys existed (v0006), so heads exported then still verify (``tenancy.signing``).
        Derived from the KEK versions still readable (the file provider keeps them)."""
        from tenancy.signing import public_key_of

        found = []
        for version in self.versions():
            try:
                found.append(public_key_of(self.derive_key(version, LEGACY_HEAD_PURPOSE)))
            except KeyProviderError:
                continue
        return found


def _decode_key(text: str, where: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyProviderError(f"{where}: the key is not valid base64.") from None
    if len(key) != crypto.KEY_BYTES:
        raise KeyProviderError(f"{where}: the key should decode to 32 bytes, got {len(key)}.")
    return key


class FileKeyProvider(KeyProvider):
    """KEKs in a local JSON file (mode 0600), created with one random key on first use."""

    name = "file"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _load(self) -> dict[int, bytes]:
        if not self.path.exists():
            private_dir(self.path.parent)
            data = {"current": 1, "keys": {"1": base64.b64encode(crypto.generate_key()).decode()}}
            # O_EXCL + 0600: never readable by others, never clobber a concurrent creator.
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as fh:
                    json.dump(data, fh)
        try:
            make_private(self.path)  # a key file others could read before 0600 was enforced
            data = json.loads(self.path.read_text())
            return {int(v): _decode_key(k, str(self.path)) for v, k in data["keys"].items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if isinstance(exc, KeyProviderError):
                raise
            raise KeyProviderError(f"Cannot read the key file {self.path}: {exc}") from None

    def current_version(self) -> int:
        return max(self._load())

    def get_kek(self, version: int) -> bytes:
        keys = self._load()
        if version not in keys:
            raise KeyProviderError(f"KEK version {version} is not in {self.path}.")
        return keys[version]

    def versions(self) -> list[int]:
        return sorted(self._load())

    def _write(self, keys: dict[int, bytes]) -> None:
        # Write a sibling 0600 file, then rename: a reader sees the old or the new file, whole.
        data = {
            "current": max(keys),
            "keys": {str(v): base64.b64encode(k).decode() for v, k in sorted(keys.items())},
        }
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def add_version(self) -> int:
        keys = self._load()
        version = max(keys) + 1
        keys[version] = crypto.generate_key()
        self._write(keys)
        return version

    def retire_version(self, version: int) -> None:
        keys = self._load()
        if version == max(keys):
            raise KeyProviderError(f"KEK version {version} is current; it cannot be retired.")
        if keys.pop(version, None) is not None:
            self._write(keys)

    # ---------------------------------------------------------------- signing keys

    @property
    def signing_path(self) -> Path:
        """The signing seeds' own file (0600), beside the KEK file and never rewritten by a
        KEK rotation; it also keeps the public keys of the KEK-derived head-signing keys
        used before v0006, captured when it was created, so their heads verify for good."""
        return self.path.with_name("signing.key")

    def _load_signing(self) -> dict[str, object]:
        if not self.signing_path.exists():
            data: dict[str, object] = {
                "format": "fedtext-signing-seeds/1",
                "seeds": {"1": base64.b64encode(os.urandom(32)).decode()},
                "legacy_head_keys": [
                    base64.b64encode(k).decode() for k in super().legacy_head_public_keys()
                ],
            }
            _create_private_json(self.signing_path, data)
        try:
            make_private(self.signing_path)
            data = json.loads(self.signing_path.read_text())
            seeds = data["seeds"]
            if not isinstance(seeds, dict) or not seeds:
                raise KeyError("seeds")
            return dict(data)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise KeyProviderError(
                f"Cannot read the signing key file {self.signing_path}: {exc}"
            ) from None

    def _seeds(self) -> dict[int, bytes]:
        raw = self._load_signing()["seeds"]
        assert isinstance(raw, dict)
        return {int(v): _decode_key(k, str(self.signing_path)) for v, k in raw.items()}

    def signing_versions(self) -> list[int]:
        return sorted(self._seeds())

    def signing_seed(self, version: int) -> bytes:
        seeds = self._seeds()
        if version not in seeds:
            raise KeyProviderError(f"Signing key version {version} is not in {self.signing_path}.")
        return seeds[version]

    def add_signing_version(self) -> int:
        data = self._load_signing()
        seeds = self._seeds()
        version = max(seeds) + 1
        seeds[version] = os.urandom(32)
        data["seeds"] = {str(v): base64.b64encode(k).decode() for v, k in sorted(seeds.items())}
        _replace_private_json(self.signing_path, data)
        return version

    def legacy_head_public_keys(self) -> list[bytes]:
        # Captured when the signing file was made: a KEK version retired since is gone.
        raw = self._load_signing().get("legacy_head_keys", [])
        assert isinstance(raw, list)
        return [base64.b64decode(k) for k in raw]


def _create_private_json(path: Path, data: dict[str, object]) -> None:
    """Write ``path`` (0600) only if it does not exist: a concurrent creator's file wins."""
    private_dir(path.parent)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        os.link(tmp, path)  # atomic create-if-absent, whole
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def _replace_private_json(path: Path, data: dict[str, object]) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class EnvKeyProvider(KeyProvider):
    """One KEK (version 1) from a base64 environment variable."""

    name = "env"

    def __init__(self, variable: str = "FEDTEXT_KEK") -> None:
        self.variable = variable

    def current_version(self) -> int:
        return 1

    def get_kek(self, version: int) -> bytes:
        value = os.environ.get(self.variable)
        if not value:
            raise KeyProviderError(f"The environment variable {self.variable} is not set.")
        if version != 1:
            raise KeyProviderError(f"{self.variable} holds KEK version 1 only, not {version}.")
        return _decode_key(value, self.variable)
