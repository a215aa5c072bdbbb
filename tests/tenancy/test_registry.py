from __future__ import annotations

import hashlib

import pytest
from sqlmodel import Session

from fedtext.plaintext_scan import looks_like_safetensors
from models import build_model, load_weights, save_weights
from tenancy.errors import DecryptionError, IntegrityError
from tenancy.platform import Platform
from tenancy.registry import read_model_weights
from tests.factories import make_tenant, store_tiny_model, tiny_spec


def test_weights_round_trip_encrypted_at_rest(platform: Platform) -> None:
    t = make_tenant(platform, "acme")
    row = store_tiny_model(platform, t.tenant)
    blob = platform.store.get(row.blob_key)
    assert not looks_like_safetensors(blob)
    assert hashlib.sha256(blob).hexdigest() == row.sha256
    with Session(platform.engine) as session:
        weights = read_model_weights(
            session=session, keyring=platform.keyring, store=platform.store, row=row
        )
    assert looks_like_safetensors(weights)
    model = load_weights(build_model(tiny_spec()), weights)
    assert save_weights(model) == weights


def test_tampered_blob_fails_its_integrity_check(platform: Platform) -> None:
    t = make_tenant(platform, "acme")
    row = store_tiny_model(platform, t.tenant)
    blob = bytearray(platform.store.get(row.blob_key))
    blob[-1] ^= 0xFF
    platform.store.put(row.blob_key, bytes(blob))
    with Session(platform.engine) as session, pytest.raises(IntegrityError, match="SHA-256"):
        read_model_weights(session=session, keyring=platform.keyring, store=platform.store, row=row)


def test_another_tenants_blob_does_not_decrypt(platform: Platform) -> None:
    a, b = make_tenant(platform, "acme"), make_tenant(platform, "globex")
    row_a = store_tiny_model(platform, a.tenant)
    row_b = store_tiny_model(platform, b.tenant)
    # Swap in the other tenant's blob with a matching hash: AES-GCM must still refuse it.
    platform.store.put(row_b.blob_key, platform.store.get(row_a.blob_key))
    row_b.sha256 = row_a.sha256
    with (
        Session(platform.engine) as session,
        pytest.raises(DecryptionError, match="failed authentication"),
    ):
        read_model_weights(
            session=session, keyring=platform.keyring, store=platform.store, row=row_b
        )


def test_versions_count_up_per_tenant_and_name(platform: Platform) -> None:
    t = make_tenant(platform, "acme")
    assert store_tiny_model(platform, t.tenant).version == 1
    assert store_tiny_model(platform, t.tenant).version == 2
    assert store_tiny_model(platform, t.tenant, name="other").version == 1
