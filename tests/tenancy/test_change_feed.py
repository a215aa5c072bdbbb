"""The tenancy change log: every recorded change is a row; other processes read them back."""

from __future__ import annotations

from sqlmodel import Session, col, select

from tenancy import events
from tenancy.db import session_scope
from tenancy.events import Change, ChangeFeed, ChangeKind
from tenancy.platform import Platform
from tenancy.registry import deploy_version
from tenancy.tables import TenancyChange
from tests.factories import make_tenant, store_tiny_model


def _as_another_process(platform: Platform, change: Change) -> None:
    """A row exactly as another process's ``record`` writes it (its own origin)."""
    with session_scope(platform.engine) as session:
        session.add(
            TenancyChange(
                kind=change.kind.value, tenant_id=change.tenant_id, name=change.name,
                origin="4242-another-process",
            )
        )  # fmt: skip


def test_recorded_changes_are_logged_and_only_other_processes_changes_come_back(
    platform: Platform,
) -> None:
    acme = make_tenant(platform, "acme")
    store_tiny_model(platform, acme.tenant, seed=0)
    store_tiny_model(platform, acme.tenant, deploy=False, seed=1)
    feed = ChangeFeed()
    with Session(platform.engine) as session:
        assert feed.poll(session) == []  # the first poll finds where the log ends
    with session_scope(platform.engine) as session:
        deploy_version(session=session, tenant_id=acme.tenant.id, name="lstm", version=2)
    with Session(platform.engine) as session:
        rows = list(session.exec(select(TenancyChange).order_by(col(TenancyChange.id))))
        assert [(r.kind, r.tenant_id, r.name, r.origin) for r in rows][-1] == (
            "version_deployed", acme.tenant.id, "lstm", events.ORIGIN,
        )  # fmt: skip
        assert feed.poll(session) == []  # this process's own change: announced at commit
    _as_another_process(platform, Change(ChangeKind.key_revoked, acme.tenant.id))
    _as_another_process(platform, Change(ChangeKind.tenant_deleted, "t-gone"))
    with Session(platform.engine) as session:
        assert feed.poll(session) == [
            Change(ChangeKind.key_revoked, acme.tenant.id),
            Change(ChangeKind.tenant_deleted, "t-gone"),
        ]
        assert feed.poll(session) == []  # each once
    # A change that is rolled back is not logged.
    with Session(platform.engine) as session:
        before = len(list(session.exec(select(TenancyChange))))
        deploy_version(session=session, tenant_id=acme.tenant.id, name="lstm", version=1)
        session.rollback()
        assert len(list(session.exec(select(TenancyChange)))) == before
    # A feed made just now still hears of changes another process wrote a moment ago.
    late = ChangeFeed()
    with Session(platform.engine) as session:
        assert Change(ChangeKind.tenant_deleted, "t-gone") in late.poll(session)
