"""Two processes that start together on a fresh PKCS#11 token end up with one KEK version 1
(SoftHSM2; the token fixture is tests/tenancy/test_hsm_keyring.py's)."""

from __future__ import annotations

from pkcs11 import Attribute, ObjectClass

from tenancy.hsm import Pkcs11KeyProvider
from tests.tenancy.test_hsm_keyring import Token, token  # noqa: F401 (the fixture)

AAD = b"fedtext:dek:tenant-1:kek-v1"


def _labelled(provider: Pkcs11KeyProvider, label: str) -> int:
    with provider._lock:
        session = provider._open()
        found = session.get_objects(
            {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label}
        )
        return len(list(found))


def test_a_second_process_generating_version_1_at_once_keeps_the_first_ones_keys(
    token: Token,  # noqa: F811
) -> None:
    config = token.config()
    first, second = Pkcs11KeyProvider(config), Pkcs11KeyProvider(config)
    assert first.current_version() == 1
    wrapped = first.wrap_key(1, b"k" * 32, AAD)  # the first one is already in use
    # The second read the token before the first generated (two replicas starting at once).
    real, stale = second.versions, [list[int]()]
    second.versions = lambda: stale.pop() if stale else real()  # type: ignore[method-assign]
    assert second.current_version() == 1
    # Before the review it generated a second version 1: every later use of the KEK failed
    # with "holds 2 keys labelled ...", in both processes.
    assert _labelled(first, f"{config.key_label}-v1") == 1
    assert _labelled(first, f"{config.key_label}-kdk-v1") == 1
    assert second.unwrap_key(1, wrapped, AAD) == b"k" * 32
    assert first.unwrap_key(1, second.wrap_key(1, b"j" * 32, AAD), AAD) == b"j" * 32
