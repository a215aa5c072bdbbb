from __future__ import annotations

from datetime import timedelta

import pytest
from sqlmodel import Session, select

from tenancy.db import session_scope
from tenancy.errors import Conflict, InvalidInput
from tenancy.platform import Platform
from tenancy.tables import ApiKey, DataKey, utcnow
from tenancy.tenants import (
    Scope,
    authenticate,
    create_api_key,
    create_tenant,
    has_scope,
    hash_key,
    parse_scopes,
)
from tests.factories import make_tenant


def test_key_is_stored_only_as_a_hash(platform: Platform) -> None:
    t = make_tenant(platform, "acme")
    with Session(platform.engine) as session:
        rows = session.exec(select(ApiKey)).all()
        assert len(rows) == 2
        stored = {r.key_hash for r in rows}
        assert hash_key(t.admin_key) in stored
        for row in rows:
            assert t.admin_key not in row.model_dump_json()
            assert t.predict_key not in row.model_dump_json()
        found = authenticate(session=session, presented=t.admin_key)
        assert found is not None and found[1].name == "acme"


def test_data_key_is_stored_wrapped(platform: Platform) -> None:
    t = make_tenant(platform, "acme")
    with Session(platform.engine) as session:
        row = session.exec(select(DataKey).where(DataKey.tenant_id == t.tenant.id)).one()
        plain = platform.keyring.data_key(session, t.tenant.id)
    assert len(plain) == 32 and plain not in row.wrapped


@pytest.mark.parametrize(
    "presented",
    [
        "",
        "Bearer",
        "ftk_",
        "ftk_abc_def",
        "xyz_123456789012_secret",
        "ftk_000000000000_" + "a" * 43,
    ],
)
def test_malformed_or_unknown_keys_do_not_authenticate(platform: Platform, presented: str) -> None:
    make_tenant(platform, "acme")
    with Session(platform.engine) as session:
        assert authenticate(session=session, presented=presented) is None


def test_tampered_secret_does_not_authenticate(platform: Platform) -> None:
    t = make_tenant(platform, "acme")
    with Session(platform.engine) as session:
        last = "B" if t.admin_key.endswith("A") else "A"
        assert authenticate(session=session, presented=t.admin_key[:-1] + last) is None


def test_revoked_and_expired_keys_do_not_authenticate(platform: Platform) -> None:
    t = make_tenant(platform, "acme")
    with session_scope(platform.engine) as session:
        _, expired = create_api_key(
            session=session,
            tenant=t.tenant,
            scopes="predict",
            expires_at=utcnow() - timedelta(seconds=1),
        )
        revoked_row, revoked = create_api_key(session=session, tenant=t.tenant, scopes="predict")
        revoked_row.revoked_at = utcnow()
        session.add(revoked_row)
    with Session(platform.engine) as session:
        assert authenticate(session=session, presented=expired) is None
        assert authenticate(session=session, presented=revoked) is None


def test_scopes(platform: Platform) -> None:
    t = make_tenant(platform, "acme")
    with Session(platform.engine) as session:
        admin = authenticate(session=session, presented=t.admin_key)
        predict = authenticate(session=session, presented=t.predict_key)
    assert admin and predict
    assert has_scope(admin[0], Scope.admin) and has_scope(admin[0], Scope.predict)
    assert has_scope(predict[0], Scope.predict) and not has_scope(predict[0], Scope.admin)
    assert parse_scopes("predict, admin,predict") == [Scope.predict, Scope.admin]
    with pytest.raises(InvalidInput, match="Unknown scope 'root'"):
        parse_scopes("root")
    with pytest.raises(InvalidInput, match="At least one scope"):
        parse_scopes("")


def test_tenant_names_are_validated_and_unique(platform: Platform) -> None:
    make_tenant(platform, "acme")
    with session_scope(platform.engine) as session:
        with pytest.raises(Conflict, match="already exists"):
            create_tenant(session=session, keyring=platform.keyring, name="acme")
        for bad in ["Acme", "-x", "a b", "", "x" * 64, "../etc"]:
            with pytest.raises(InvalidInput, match="Invalid tenant name"):
                create_tenant(session=session, keyring=platform.keyring, name=bad)
        with pytest.raises(InvalidInput, match="epsilon budget should be a positive"):
            create_tenant(session=session, keyring=platform.keyring, name="zed", budget_epsilon=0)


def test_deleting_a_tenant_withdraws_every_consent_given_by_or_to_it(platform: Platform) -> None:
    from tenancy.rotation import delete_tenant
    from tenancy.tenants import partner_names, set_partners

    acme, globex = make_tenant(platform, "acme"), make_tenant(platform, "globex")
    initech = make_tenant(platform, "initech")
    with session_scope(platform.engine) as session:
        set_partners(session=session, tenant=acme.tenant, names=["globex", "initech"])
        set_partners(session=session, tenant=globex.tenant, names=["acme"])
    delete_tenant(platform.engine, platform.keyring, platform.store, tenant_id=globex.tenant.id)
    with Session(platform.engine) as session:
        assert partner_names(session=session, tenant_id=acme.tenant.id) == ["initech"]
        assert partner_names(session=session, tenant_id=globex.tenant.id) == []
        assert partner_names(session=session, tenant_id=initech.tenant.id) == []
