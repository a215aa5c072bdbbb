from __future__ import annotations

from fastapi import APIRouter

from privacy.accounting import DEFAULT_ACCOUNTANT, compose_epsilon
from privacy.ledger import tenant_events
from serving.deps import AdminCaller, SessionDep
from serving.schemas import BudgetPublic, LedgerEntryPublic

router = APIRouter(prefix="/v1/privacy", tags=["privacy"])


@router.get("/budget", response_model=BudgetPublic)
def budget(caller: AdminCaller, session: SessionDep) -> BudgetPublic:
    tenant = caller.tenant
    events = [e.params() for e in tenant_events(session, tenant.id)]
    spent = compose_epsilon(events, tenant.budget_delta, DEFAULT_ACCOUNTANT)
    return BudgetPublic(
        tenant=tenant.name,
        budget_epsilon=tenant.budget_epsilon,
        delta=tenant.budget_delta,
        spent_epsilon=spent,
        spent_epsilon_rdp=compose_epsilon(events, tenant.budget_delta, "rdp"),
        remaining_epsilon=max(0.0, tenant.budget_epsilon - spent),
        accountant=DEFAULT_ACCOUNTANT,
        events=len(events),
    )


@router.get("/ledger", response_model=list[LedgerEntryPublic])
def ledger(caller: AdminCaller, session: SessionDep) -> list[LedgerEntryPublic]:
    return [
        LedgerEntryPublic.model_validate(e, from_attributes=True)
        for e in tenant_events(session, caller.tenant.id)
    ]
