"""Budgets per tenant and per dataset, changes recorded in their own chain, the dispatch gate."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlmodel import Session

from models import ModelSpec
from privacy.accounting import compose_epsilon
from privacy.budget import (
    BudgetError,
    change_budget,
    check_budget,
    check_release,
    dataset_budgets,
)
from privacy.ledger import (
    TENANT_WIDE,
    PrivacyEvent,
    budget_changes,
    record_event,
    tenant_events,
    verify_chain,
)
from privacy.params import DPParams
from server.charging import make_charge
from server.planning import TenantPlan
from tenancy.db import session_scope
from tenancy.platform import Platform
from tenancy.tables import Tenant
from tests.factories import make_tenant

EV = DPParams(1.0, 0.05, 100, 1.0, 1e-5)
ONE = compose_epsilon([EV], 1e-5)


def charge_events(platform: Platform, tenant_id: str, dataset: str, n: int) -> None:
    with session_scope(platform.engine) as session:
        for rnd in range(1, n + 1):
            record_event(
                session,
                tenant_id=tenant_id,
                run_id="r0",
                round=rnd,
                params=EV,
                spec_sha256="0" * 64,
                dataset=dataset,
            )


def test_raising_a_budget_is_recorded_and_chained(platform: Platform) -> None:
    acme = make_tenant(platform, "acme", budget_epsilon=2.0).tenant
    with session_scope(platform.engine) as session:
        tenant = session.get(Tenant, acme.id)
        assert tenant is not None
        change_budget(session, tenant=tenant, new_epsilon=5.0, actor="admin key ab", reason="Q3")
        change_budget(session, tenant=tenant, new_epsilon=1.5, actor="operator", dataset="tickets")
    with Session(platform.engine) as session:
        tenant = session.get(Tenant, acme.id)
        assert tenant is not None and tenant.budget_epsilon == 5.0
        changes = budget_changes(session, acme.id)
        # The budget a tenant is created with is the chain's first entry.
        assert [(c.dataset, c.old_epsilon, c.new_epsilon) for c in changes] == [
            (TENANT_WIDE, None, 2.0),
            (TENANT_WIDE, 2.0, 5.0),
            ("tickets", None, 1.5),
        ]
        assert changes[0].reason == "initial budget" and changes[0].delta == 1e-5
        assert changes[1].actor == "admin key ab" and changes[1].reason == "Q3"
        assert changes[2].prev_hash == changes[1].entry_hash
        assert verify_chain(changes) is None
        assert dataset_budgets(session, acme.id) == {"tickets": 1.5}
    # Someone lowers the recorded old value behind the API's back: the chain says so.
    with platform.engine.begin() as conn:
        conn.execute(text("UPDATE privacy_budget_change SET new_epsilon = 50 WHERE seq = 2"))
    with Session(platform.engine) as session:
        problem = verify_chain(budget_changes(session, acme.id))
    assert problem is not None and problem.seq == 2 and "edited" in problem.reason


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"new_epsilon": 0.0}, "positive"),
        ({"new_epsilon": float("nan")}, "finite"),
        ({"new_epsilon": 3.0, "actor": " "}, "actor"),
        ({"new_epsilon": 3.0, "dataset": "bad name!"}, "Invalid dataset name"),
    ],
)
def test_bad_budget_changes_are_refused(
    sqlite_platform: Platform, kwargs: dict[str, object], message: str
) -> None:
    acme = make_tenant(sqlite_platform, "acme").tenant
    with (
        session_scope(sqlite_platform.engine) as session,
        pytest.raises(BudgetError, match=message),
    ):
        tenant = session.get(Tenant, acme.id)
        change_budget(session, tenant=tenant, **{"actor": "op", **kwargs})  # type: ignore[arg-type]


def test_dataset_budget_refuses_while_the_tenant_budget_still_allows(platform: Platform) -> None:
    acme = make_tenant(platform, "acme", budget_epsilon=100.0).tenant
    charge_events(platform, acme.id, "tickets", 2)
    charge_events(platform, acme.id, "emails", 3)
    with session_scope(platform.engine) as session:
        tenant = session.get(Tenant, acme.id)
        assert tenant is not None
        change_budget(
            session,
            tenant=tenant,
            new_epsilon=compose_epsilon([EV] * 2, 1e-5) + 0.01,
            actor="op",
            dataset="tickets",
        )
        refused = check_release(session, tenant=tenant, dataset="tickets", new_events=[EV])
        assert not refused.allowed and refused.scope == "tickets"
        assert "would exceed the budget of dataset 'tickets'" in refused.reason
        # The dataset figure composes only that dataset's two releases.
        assert refused.spent == pytest.approx(compose_epsilon([EV] * 2, 1e-5))
        other = check_release(session, tenant=tenant, dataset="emails", new_events=[EV])
        assert other.allowed and other.scope == TENANT_WIDE
        # The tenant figure composes all five releases, whatever the dataset.
        assert other.spent == pytest.approx(compose_epsilon([EV] * 5, 1e-5))


def test_a_round_over_budget_is_refused_before_dispatch_and_not_charged(
    platform: Platform,
) -> None:
    acme = make_tenant(platform, "acme", budget_epsilon=ONE * 1.05).tenant
    globex = make_tenant(platform, "globex", budget_epsilon=100.0).tenant
    charge_events(platform, acme.id, "default", 1)
    spec = ModelSpec.create("lstm", ["negative", "neutral", "positive"], max_seq_len=16)
    unlimited = check_budget([], [EV], budget_epsilon=1e9, delta=1e-5)
    plans = [
        TenantPlan(
            tenant_id=t.id,
            tenant_name=t.name,
            node_id=i,
            num_train=2000,
            num_test=10,
            round_params=EV,
            rounds=1,
            budget=unlimited,
        )
        for i, t in enumerate((acme, globex), start=1)
    ]
    charge = make_charge(platform, "run-x", spec, lambda p: p.round_params)
    allowed = charge(1, plans)
    # Only globex is dispatched; acme's refusal wrote nothing to its ledger.
    assert [p.tenant_name for p in allowed] == ["globex"]
    with Session(platform.engine) as session:
        assert len(tenant_events(session, acme.id)) == 1
        (ev,) = tenant_events(session, globex.id)
        assert isinstance(ev, PrivacyEvent) and ev.run_id == "run-x" and ev.dataset == "default"
