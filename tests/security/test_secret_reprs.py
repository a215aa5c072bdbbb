"""Secrets do not appear in the repr of the objects that hold them (logs, tracebacks)."""

from __future__ import annotations

import sys

from tenancy.hsm import Pkcs11Config


def test_the_token_pin_is_not_in_the_pkcs11_configs_repr() -> None:
    config = Pkcs11Config(module=sys.executable, token_label="fedtext", pin="pin-7f3a9c")
    assert "pin-7f3a9c" not in repr(config) and "pin-7f3a9c" not in str(config)
    assert "fedtext" in repr(config)  # the rest still reads
