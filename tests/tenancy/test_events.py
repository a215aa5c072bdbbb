"""Change notifications: tenancy's write functions announce what they committed, only that."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlmodel import Session, select

from tenancy.db import session_scope
from tenancy.errors import NotFound
from tenancy.events import Change, ChangeKind, record, subscribe
from tenancy.platform import Platform
from tenancy.registry import deploy_version, set_quantize
from tenancy.rotation import delete_tenant, rotate_dek
from tenancy.tables import ApiKey, Tenant, utcnow
from tenancy.tenants import hash_key, is_live, revoke_api_key
from tests.factories import TenantFixture, make_tenant, store_tiny_model


class Heard:
    """A subscriber that keeps what it hears (held by the test: listeners are weak)."""

    def __init__(self) -> None:
        self.changes: list[Change] = []

    def on_change(self, change: Change) -> None:
        self.changes.append(change)


@pytest.fixture
def heard() -> Iterator[Heard]:
    listener = Heard()
    unsubscribe = subscribe(listener.on_change)
    yield listener
    unsubscribe()


@pytest.fixture
def acme(platform: Platform) -> TenantFixture:
    t = make_tenant(platform, "acme")
    store_tiny_model(platform, t.tenant, seed=0)
    store_tiny_model(platform, t.tenant, deploy=False, seed=1)
    return t


def _key_id(platform: Platform, secret: str) -> str:
    with Session(platform.engine) as session:
        return session.exec(select(ApiKey.id).where(ApiKey.key_hash == hash_key(secret))).one()


def test_a_change_is_heard_once_its_session_commits(platform: Platform, heard: Heard) -> None:
    change = Change(ChangeKind.key_revoked, "t1")
    with Session(platform.engine) as session:
        session.connection()
        record(session, change)
        assert heard.changes == []
        session.commit()
    assert heard.changes == [change]
    with Session(platform.engine) as session:
        session.commit()  # nothing pending: nothing heard again
    assert heard.changes == [change]


def test_a_rolled_back_or_uncommitted_change_is_never_heard(
    platform: Platform, heard: Heard
) -> None:
    with Session(platform.engine) as session:
        session.connection()
        record(session, Change(ChangeKind.key_revoked, "t1"))
        session.rollback()
        session.commit()
    with Session(platform.engine) as session:
        session.connection()
        record(session, Change(ChangeKind.key_revoked, "t2"))
    with pytest.raises(RuntimeError), session_scope(platform.engine) as session:
        record(session, Change(ChangeKind.key_revoked, "t3"))
        raise RuntimeError("the write fails")
    assert heard.changes == []


def test_a_dropped_listener_stops_listening(platform: Platform) -> None:
    listener = Heard()
    subscribe(listener.on_change)
    del listener
    gc.collect()
    with Session(platform.engine) as session:  # nothing left to call: no error either
        record(session, Change(ChangeKind.key_revoked, "t1"))
        session.commit()


def test_a_failing_listener_does_not_fail_the_write_nor_the_others(
    platform: Platform, acme: TenantFixture, heard: Heard
) -> None:
    class Broken:
        def on_change(self, change: Change) -> None:
            raise RuntimeError("listener bug")

    broken = Broken()
    unsubscribe = subscribe(broken.on_change)
    try:
        with session_scope(platform.engine) as session:
            revoke_api_key(
                session=session,
                tenant_id=acme.tenant.id,
                key_id=_key_id(platform, acme.predict_key),
            )
    finally:
        unsubscribe()
    assert [c.kind for c in heard.changes] == [ChangeKind.key_revoked]


def test_each_write_function_announces_its_change(
    platform: Platform, acme: TenantFixture, heard: Heard
) -> None:
    tid = acme.tenant.id
    with session_scope(platform.engine) as session:
        deploy_version(session=session, tenant_id=tid, name="lstm", version=2)
    with session_scope(platform.engine) as session:
        set_quantize(session=session, tenant_id=tid, name="lstm", version=2, quantize=None)
    with session_scope(platform.engine) as session:
        revoke_api_key(session=session, tenant_id=tid, key_id=_key_id(platform, acme.predict_key))
    rotate_dek(platform.engine, platform.keyring, platform.store, tenant="acme")
    delete_tenant(platform.engine, platform.keyring, platform.store, tenant_id=tid)
    assert heard.changes == [
        Change(ChangeKind.version_deployed, tid, "lstm"),
        Change(ChangeKind.serving_options, tid, "lstm"),
        Change(ChangeKind.key_revoked, tid),
        Change(ChangeKind.data_key_rotated, tid),
        Change(ChangeKind.tenant_deleted, tid),
    ]


def test_revoking_is_idempotent_and_another_tenants_key_is_not_found(
    platform: Platform, acme: TenantFixture, heard: Heard
) -> None:
    globex = make_tenant(platform, "globex")
    key_id = _key_id(platform, acme.predict_key)
    with session_scope(platform.engine) as session, pytest.raises(NotFound):
        revoke_api_key(session=session, tenant_id=globex.tenant.id, key_id=key_id)
    for _ in range(2):
        with session_scope(platform.engine) as session:
            key = revoke_api_key(session=session, tenant_id=acme.tenant.id, key_id=key_id)
            assert key.revoked_at is not None
    assert len(heard.changes) == 1  # the second call changed nothing


def test_one_rule_for_a_live_key(platform: Platform, acme: TenantFixture) -> None:
    with Session(platform.engine) as session:
        key = session.exec(
            select(ApiKey).where(ApiKey.key_hash == hash_key(acme.predict_key))
        ).one()
        tenant = session.get(Tenant, acme.tenant.id)
    assert tenant is not None
    now = utcnow()
    assert is_live(key, tenant, now)
    assert not is_live(key, None, now)
    gone = tenant.model_copy(update={"deleted_at": now})
    assert not is_live(key, gone, now)
    assert not is_live(key.model_copy(update={"revoked_at": now}), tenant, now)
    expiring = key.model_copy(update={"expires_at": now + timedelta(seconds=1)})
    assert is_live(expiring, tenant, now)
    assert not is_live(expiring, tenant, now + timedelta(seconds=1))
