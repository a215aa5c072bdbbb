"""The platform's signing keys: apart from the KEK, with an endorsed public history."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from tenancy.hsm import Pkcs11KeyProvider
from tenancy.key_providers import FileKeyProvider
from tenancy.keyring import Keyring
from tenancy.signing import SigningHistory, check, key_id, public_key_of, sign
from tests.tenancy.test_hsm_keyring import HAVE_SOFTHSM, Token, token  # noqa: F401


def test_known_answer_and_tampering() -> None:
    seed = bytes(range(32))
    signature = sign(seed, b"message")
    trusted = {key_id(public_key_of(seed)): public_key_of(seed)}
    assert check(signature, b"message", trusted) == "ok"
    assert check(signature, b"messagf", trusted) == "bad"
    assert check(None, b"message", trusted) == "unsigned"
    assert check(signature, b"message", {}) == "unknown-key"
    kid, _, sig = signature.partition(":")
    raw = bytearray(base64.b64decode(sig))
    raw[0] ^= 1
    assert check(f"{kid}:{base64.b64encode(bytes(raw)).decode()}", b"message", trusted) == "bad"


def test_the_file_providers_signing_key_survives_kek_rotation(tmp_path: Path) -> None:
    provider = FileKeyProvider(tmp_path / "keys" / "kek.key")
    keyring = Keyring(provider)
    history = keyring.signing.history()
    seed = keyring.signing_seed()
    assert [k.kind for k in history.keys] == ["signing", "legacy-head"]
    assert stat.S_IMODE(os.stat(provider.signing_path).st_mode) == 0o600
    provider.add_version()
    provider.retire_version(1)  # the KEK that derived the legacy head key is gone
    again = Keyring(FileKeyProvider(tmp_path / "keys" / "kek.key"))
    assert again.signing_seed() == seed
    assert again.signing.history().keys == history.keys  # legacy key kept, still endorsed
    assert set(again.signing_key_ids()) == {k.key_id for k in history.keys}


def test_rotation_is_endorsed_and_a_forged_record_is_not_trusted(tmp_path: Path) -> None:
    keyring = Keyring(FileKeyProvider(tmp_path / "kek.key"))
    first = keyring.signing.history().current()
    second = keyring.signing.rotate()
    assert second.version == 2 and second.endorsed_by == first.key_id
    history = keyring.signing.history()
    assert second.key_id in history.trusted([first.key_id])
    # A record someone adds to the history, without the previous key, is not trusted.
    forged_seed = os.urandom(32)
    forged = second.model_copy(
        update={
            "version": 3,
            "public_key": base64.b64encode(public_key_of(forged_seed)).decode(),
            "key_id": key_id(public_key_of(forged_seed)),
        }
    )
    padded = SigningHistory(keys=[*history.keys, forged])
    assert forged.key_id not in padded.trusted()
    assert second.key_id in padded.trusted()


@pytest.mark.skipif(
    not HAVE_SOFTHSM and not os.environ.get("CI"), reason="SoftHSM2 is not installed"
)
def test_the_pkcs11_signing_key_lives_in_the_token_and_survives_kek_rotation(
    token: Token,  # noqa: F811
) -> None:
    from pkcs11 import Attribute

    provider = Pkcs11KeyProvider(token.config())
    assert provider.current_version() == 1  # KEK version 1, generated on first use
    keyring = Keyring(provider)
    seed = keyring.signing_seed()
    with provider._lock:
        key = provider._find(1, "sign-")
        assert key[Attribute.SENSITIVE] and not key[Attribute.EXTRACTABLE]
    provider.add_version()
    provider.retire_version(1)
    again = Keyring(Pkcs11KeyProvider(provider.config))
    assert again.signing_seed() == seed
    rotated = again.signing.rotate()
    assert rotated.version == 2 and rotated.key_id in again.signing.history().trusted()
