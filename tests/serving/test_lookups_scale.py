"""The lookup memo at many tenants: a change forgets its tenant only; refresh keeps the rest."""

from __future__ import annotations

from sqlmodel import Session

from serving.runtime.lookups import PredictLookups
from serving.runtime.model_cache import find_deployed
from tenancy.db import session_scope
from tenancy.platform import Platform
from tenancy.registry import deploy_version
from tenancy.tables import ApiKey, utcnow
from tenancy.tenants import authenticate, hash_key
from tests.factories import TenantFixture, make_tenant, store_tiny_model


def _memoize(platform: Platform, lookups: PredictLookups, tenant: TenantFixture) -> None:
    with Session(platform.engine, expire_on_commit=False) as session:
        found = authenticate(session=session, presented=tenant.predict_key)
        assert found is not None
        lookups.put_caller(tenant.predict_key, *found, lookups.generation)
        lookups.put_deployed(find_deployed(session, found[1].id, "lstm"), lookups.generation)


def test_a_change_forgets_only_its_tenant_and_refresh_keeps_what_did_not_change(
    platform: Platform,
) -> None:
    tenants = [make_tenant(platform, n) for n in ("acme", "globex", "initech")]
    for t in tenants:
        store_tiny_model(platform, t.tenant, seed=0)
        store_tiny_model(platform, t.tenant, deploy=False, seed=1)
    acme, globex, initech = tenants
    lookups = PredictLookups(ttl=60)
    for t in tenants:
        _memoize(platform, lookups, t)
    kept = lookups.caller(globex.predict_key)
    assert kept is not None

    lookups.forget_tenant(acme.tenant.id)  # what the predict service does on acme's change
    assert lookups.caller(acme.predict_key) is None
    assert lookups.deployed(acme.tenant.id, "lstm") is None
    assert lookups.caller(globex.predict_key) is kept  # untouched, not re-read

    # Written around tenancy's functions (no change-log row): the refresh still sees it.
    with Session(platform.engine) as session:
        key = next(
            k for k in session.query(ApiKey).all() if k.key_hash == hash_key(initech.predict_key)
        )
        key.revoked_at = utcnow()
        session.add(key)
        session.commit()
    with session_scope(platform.engine) as session:
        deploy_version(session=session, tenant_id=globex.tenant.id, name="lstm", version=2)
    with Session(platform.engine) as session:
        lookups.refresh(session)
    assert lookups.caller(initech.predict_key) is None  # revoked: dropped
    assert lookups.caller(globex.predict_key) is kept  # same rows: the same objects kept
    assert lookups.deployed(globex.tenant.id, "lstm") is None  # v2 deployed: re-read on use
    assert lookups.deployed(initech.tenant.id, "lstm") is not None


def test_the_fingerprint_tells_rows_apart_that_python_hash_would_not(platform: Platform) -> None:
    """hash(-1) == hash(-2): the memo's fingerprint of a deployment row is a keyed digest of
    its values, so an edit of any column around the platform is seen by the next refresh."""
    from serving.runtime.lookups import DeployedRef

    acme = make_tenant(platform, "acme")
    store_tiny_model(platform, acme.tenant, seed=0)
    with Session(platform.engine) as session:
        row = find_deployed(session, acme.tenant.id, "lstm")
        session.expunge(row)
    refs: list[DeployedRef] = []
    for size in (-1, -2):
        row.size_bytes = size
        lookups = PredictLookups(ttl=60)
        lookups.put_deployed(row, lookups.generation)
        ref = lookups.deployed(acme.tenant.id, "lstm")
        assert ref is not None
        refs.append(ref)
    assert hash(-1) == hash(-2)
    assert refs[0].fingerprint != refs[1].fingerprint
