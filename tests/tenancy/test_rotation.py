"""KEK and data-key rotation, tenant deletion (crypto-shredding), wrong-tenant associated data."""

from __future__ import annotations

import json

import pytest
from sqlmodel import Session, select

from privacy.ledger import PrivacyEvent, tenant_events
from tenancy import crypto
from tenancy.errors import DecryptionError, NotFound
from tenancy.keyring import _wrap_aad
from tenancy.platform import Platform
from tenancy.registry import get_version, model_aad, read_model_weights, store_model_version
from tenancy.rotation import delete_tenant, deleted_tenants, rotate_dek, rotate_kek
from tenancy.tables import ApiKey, DataKey, ModelVersion, Tenant, TrainingRun
from tenancy.tenants import authenticate
from tests.factories import make_tenant, store_tiny_model


def _weights(platform: Platform, row: ModelVersion) -> bytes:
    with Session(platform.engine) as session:
        return read_model_weights(
            session=session, keyring=platform.keyring, store=platform.store, row=row
        )


def _every_remaining_key(platform: Platform) -> list[bytes]:
    """Every key material the platform still holds: KEKs, derived keys, all data keys."""
    provider = platform.keyring.provider
    keys = [provider.get_kek(v) for v in provider.versions()]
    keys += [crypto.derive_key(k, f"fedtext:{p}") for k in list(keys) for p in ("checkpoint",)]
    with Session(platform.engine) as session:
        for row in session.exec(select(DataKey)):
            keys.append(platform.keyring._unwrap(row))
    return keys


def test_rotate_kek_rewraps_every_data_key_and_retires_the_old_version(
    platform: Platform,
) -> None:
    a, b = make_tenant(platform, "acme"), make_tenant(platform, "globex")
    mv = store_tiny_model(platform, a.tenant)
    before = _weights(platform, mv)
    with Session(platform.engine) as session:
        old_wrapped = {r.tenant_id: r.wrapped for r in session.exec(select(DataKey))}
    done = rotate_kek(platform.engine, platform.keyring, grace_seconds=0)
    assert (done.new_version, done.rewrapped, done.retired, done.kept) == (2, 2, [1], [])
    assert platform.keyring.provider.versions() == [2]
    data = json.loads(platform.keyring.provider.path.read_text())  # type: ignore[attr-defined]
    assert data["current"] == 2 and list(data["keys"]) == ["2"]
    with Session(platform.engine) as session:
        rows = list(session.exec(select(DataKey)))
    assert {r.kek_version for r in rows} == {2}
    assert all(old_wrapped[r.tenant_id] != r.wrapped for r in rows)
    assert _weights(platform, mv) == before  # the data key itself did not change
    assert {a.tenant.id, b.tenant.id} == {r.tenant_id for r in rows}


def test_rotate_kek_keeps_a_version_that_a_checkpoint_still_uses(platform: Platform) -> None:
    make_tenant(platform, "acme")
    with Session(platform.engine) as session:
        session.add(
            TrainingRun(status="running", checkpoint_blob="runs/x.ftx", checkpoint_kek_version=1)
        )
        session.commit()
    done = rotate_kek(platform.engine, platform.keyring, grace_seconds=0)
    assert done.kept == [1] and done.retired == []
    assert platform.keyring.provider.versions() == [1, 2]


def test_rotate_kek_refuses_on_the_env_provider(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tenancy.errors import KeyProviderError

    monkeypatch.setenv("FEDTEXT_KEK", "A" * 43 + "=")
    p = Platform.create(
        database_url=f"sqlite:///{tmp_path / 'e.db'}",
        blob_dir=tmp_path / "b",
        key_provider="env",
        kek_file=tmp_path / "unused",
    )
    with pytest.raises(KeyProviderError, match="cannot rotate"):
        rotate_kek(p.engine, p.keyring, grace_seconds=0)


def test_rotate_dek_reencrypts_blobs_and_destroys_the_old_key(platform: Platform) -> None:
    a = make_tenant(platform, "acme")
    other = make_tenant(platform, "globex")
    v1 = store_tiny_model(platform, a.tenant, seed=0)
    v2 = store_tiny_model(platform, a.tenant, seed=1)
    theirs = store_tiny_model(platform, other.tenant, seed=2)
    plain = {v.version: _weights(platform, v) for v in (v1, v2)}
    old_blobs = {v.version: platform.store.get(v.blob_key) for v in (v1, v2)}
    with Session(platform.engine) as session:
        old_key = platform.keyring.data_key(session, a.tenant.id)
        their_key_row = session.exec(
            select(DataKey).where(DataKey.tenant_id == other.tenant.id)
        ).one()
    done = rotate_dek(platform.engine, platform.keyring, platform.store, tenant="acme")
    assert done.reencrypted == 2
    with Session(platform.engine) as session:
        new_key = platform.keyring.data_key(session, a.tenant.id)
        assert len(list(session.exec(select(DataKey).where(DataKey.tenant_id == a.tenant.id)))) == 1
        rows = {
            v: get_version(session=session, tenant_id=a.tenant.id, name="lstm", version=v)
            for v in (1, 2)
        }
        still = session.exec(select(DataKey).where(DataKey.tenant_id == other.tenant.id)).one()
    assert new_key != old_key
    assert still.wrapped == their_key_row.wrapped  # another tenant is untouched
    for version, row in rows.items():
        assert _weights(platform, row) == plain[version]
        assert platform.store.get(row.blob_key) != old_blobs[version]
        with pytest.raises(NotFound):  # the old ciphertext file is gone
            platform.store.get((v1 if version == 1 else v2).blob_key)
        # The old ciphertext (e.g. from a backup) opens with none of the keys that remain.
        for key in _every_remaining_key(platform):
            with pytest.raises(DecryptionError):
                crypto.decrypt(key, old_blobs[version], model_aad(a.tenant.id, "lstm", version))
    assert _weights(platform, theirs)


def test_rotate_dek_of_an_unknown_tenant_is_not_found(platform: Platform) -> None:
    with pytest.raises(NotFound, match="No tenant named 'nobody'"):
        rotate_dek(platform.engine, platform.keyring, platform.store, tenant="nobody")


def test_delete_tenant_shreds_its_models_revokes_keys_and_keeps_its_ledger(
    platform: Platform,
) -> None:
    a, b = make_tenant(platform, "acme"), make_tenant(platform, "globex")
    mv = store_tiny_model(platform, a.tenant)
    kept = store_tiny_model(platform, b.tenant)
    blob = platform.store.get(mv.blob_key)
    _charge(platform, a.tenant.id)
    done = delete_tenant(platform.engine, platform.keyring, platform.store, tenant_id=a.tenant.id)
    assert (done.revoked_keys, done.destroyed_data_keys, done.removed_blobs) == (2, 1, 1)
    with Session(platform.engine) as session:
        assert session.exec(select(DataKey).where(DataKey.tenant_id == a.tenant.id)).first() is None
        assert (
            session.exec(select(ModelVersion).where(ModelVersion.tenant_id == a.tenant.id)).first()
            is None
        )
        keys = list(session.exec(select(ApiKey).where(ApiKey.tenant_id == a.tenant.id)))
        assert keys and all(k.revoked_at is not None for k in keys)
        assert authenticate(session=session, presented=a.admin_key) is None
        # The ledger stays, and the tenant row says it belonged to a deleted tenant.
        assert len(tenant_events(session, a.tenant.id)) == 1
        row = session.get(Tenant, a.tenant.id)
        assert row is not None and row.deleted_at is not None
        assert [t.name for t in deleted_tenants(session)] == ["acme"]
        with pytest.raises(NotFound):
            platform.keyring.data_key(session, a.tenant.id)
    with pytest.raises(NotFound):
        platform.store.get(mv.blob_key)
    for key in _every_remaining_key(platform):
        with pytest.raises(DecryptionError):
            crypto.decrypt(key, blob, model_aad(a.tenant.id, "lstm", 1))
    assert _weights(platform, kept)  # the other tenant still serves
    with pytest.raises(NotFound):
        delete_tenant(platform.engine, platform.keyring, platform.store, tenant_id=a.tenant.id)


def _charge(platform: Platform, tenant_id: str) -> None:
    from privacy.ledger import record_event
    from privacy.params import DPParams

    with Session(platform.engine) as session:
        record_event(
            session,
            tenant_id=tenant_id,
            run_id="r1",
            round=1,
            params=DPParams(1.0, 0.01, 100, 1.0, 1e-5),
            spec_sha256="0" * 64,
        )
        session.commit()
    with Session(platform.engine) as session:
        assert session.exec(select(PrivacyEvent)).first() is not None


def test_a_blob_under_another_tenants_associated_data_does_not_decrypt(
    platform: Platform,
) -> None:
    a, b = make_tenant(platform, "acme"), make_tenant(platform, "globex")
    mv = store_tiny_model(platform, a.tenant)
    blob = platform.store.get(mv.blob_key)
    with Session(platform.engine) as session:
        key = platform.keyring.data_key(session, a.tenant.id)
        their_key = platform.keyring.data_key(session, b.tenant.id)
    assert crypto.decrypt(key, blob, model_aad(a.tenant.id, "lstm", 1))
    for aad in (
        model_aad(b.tenant.id, "lstm", 1),  # the right key, another tenant's binding
        model_aad(a.tenant.id, "lstm", 2),
        model_aad(a.tenant.id, "other", 1),
    ):
        with pytest.raises(DecryptionError, match="another tenant, model or version"):
            crypto.decrypt(key, blob, aad)
    with pytest.raises(DecryptionError):
        crypto.decrypt(their_key, blob, model_aad(b.tenant.id, "lstm", 1))
    # A wrapped data key moved to another tenant's row does not unwrap either.
    with Session(platform.engine) as session:
        row = session.exec(select(DataKey).where(DataKey.tenant_id == a.tenant.id)).one()
        kek = platform.keyring.provider.get_kek(row.kek_version)
        with pytest.raises(DecryptionError, match="wrapped data key"):
            crypto.decrypt(
                kek, row.wrapped, _wrap_aad(b.tenant.id, row.kek_version), "wrapped data key"
            )
    # And a copy of acme's blob stored as globex's model is refused when served.
    with Session(platform.engine, expire_on_commit=False) as session:
        theirs = store_model_version(
            session=session,
            keyring=platform.keyring,
            store=platform.store,
            tenant=b.tenant,
            name="lstm",
            spec_json=mv.spec_json,
            weights=b"x",
        )
        session.commit()
    platform.store.put(theirs.blob_key, blob)
    import hashlib

    with Session(platform.engine) as session:
        row2 = session.get(ModelVersion, theirs.id)
        assert row2 is not None
        row2.sha256 = hashlib.sha256(blob).hexdigest()  # even with a matching checksum
        session.add(row2)
        session.commit()
        with pytest.raises(DecryptionError):
            read_model_weights(
                session=session, keyring=platform.keyring, store=platform.store, row=row2
            )
