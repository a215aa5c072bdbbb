from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest

from tenancy import crypto
from tenancy.errors import DecryptionError, KeyProviderError
from tenancy.key_providers import EnvKeyProvider, FileKeyProvider
from tenancy.keyring import create_key_provider

KEY = bytes(range(32))
AAD = b"fedtext:model:t1:lstm:v1"


def test_round_trip_and_fresh_nonce() -> None:
    a = crypto.encrypt(KEY, b"weights", AAD)
    b = crypto.encrypt(KEY, b"weights", AAD)
    assert a != b  # a fresh 96-bit nonce each time
    assert crypto.decrypt(KEY, a, AAD) == b"weights"
    assert b"weights" not in a


def test_known_answer_with_a_fixed_nonce() -> None:
    # AES-256-GCM known answer (key 00..1f, nonce 000..0, empty AAD, empty plaintext):
    # only the tag; checks that we use the right primitive and header layout.
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    blob = crypto.FORMAT_V1 + bytes(12) + AESGCM(KEY).encrypt(bytes(12), b"", b"")
    assert crypto.decrypt(KEY, blob, b"") == b""


def test_flipped_byte_fails_loudly() -> None:
    blob = bytearray(crypto.encrypt(KEY, b"weights" * 100, AAD))
    blob[40] ^= 0x01
    with pytest.raises(DecryptionError, match="failed authentication"):
        crypto.decrypt(KEY, bytes(blob), AAD)


def test_wrong_associated_data_fails() -> None:
    blob = crypto.encrypt(KEY, b"weights", AAD)
    with pytest.raises(DecryptionError, match="another tenant, model or version"):
        crypto.decrypt(KEY, blob, b"fedtext:model:t2:lstm:v1")


def test_other_tenants_key_fails() -> None:
    blob = crypto.encrypt(KEY, b"weights", AAD)
    with pytest.raises(DecryptionError):
        crypto.decrypt(bytes(32), blob, AAD)


def test_foreign_bytes_are_refused_before_decryption() -> None:
    with pytest.raises(DecryptionError, match="not a fedtext ciphertext"):
        crypto.decrypt(KEY, b"\x08\x00\x00\x00\x00\x00\x00\x00{}" + bytes(40), AAD)
    with pytest.raises(ValueError, match="32 bytes"):
        crypto.encrypt(b"short", b"x", AAD)


def test_file_key_provider_creates_a_private_key_file(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "kek.key"
    provider = FileKeyProvider(path)
    kek = provider.get_kek(provider.current_version())
    assert len(kek) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert FileKeyProvider(path).get_kek(1) == kek  # stable across instances


def test_file_key_provider_reports_a_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "kek.key"
    path.write_text('{"current": 1, "keys": {"1": "not base64!"}}')
    with pytest.raises(KeyProviderError, match="not valid base64"):
        FileKeyProvider(path).check()


def test_env_key_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    provider = EnvKeyProvider("FEDTEXT_TEST_KEK")
    monkeypatch.delenv("FEDTEXT_TEST_KEK", raising=False)
    with pytest.raises(KeyProviderError, match="FEDTEXT_TEST_KEK is not set"):
        provider.check()
    monkeypatch.setenv("FEDTEXT_TEST_KEK", base64.b64encode(b"x" * 16).decode())
    with pytest.raises(KeyProviderError, match="32 bytes, got 16"):
        provider.check()
    monkeypatch.setenv("FEDTEXT_TEST_KEK", base64.b64encode(KEY).decode())
    assert provider.get_kek(1) == KEY


def test_unknown_key_provider_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Unknown key provider 'vault'"):
        create_key_provider("vault", kek_file=tmp_path / "k", kek_env="X")
