"""Privacy routes: budget (read and change), ledger export, audit report.

No route updates or deletes a ledger entry; changing a budget appends to the
tenant's budget chain.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, status
from fastapi.responses import HTMLResponse, Response, StreamingResponse

from privacy.accounting import DEFAULT_ACCOUNTANT, compose_epsilon
from privacy.budget import BudgetError, change_budget, dataset_budgets
from privacy.export import iter_csv, iter_jsonl
from privacy.ledger import TENANT_WIDE, budget_changes, tenant_events
from privacy.report import build_report, render_html
from serving.deps import AdminCaller, SessionDep
from serving.schemas import (
    BudgetChangePublic,
    BudgetChangeRequest,
    BudgetPublic,
    LedgerEntryPublic,
    PrivacyReportPublic,
)

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
        dataset_budgets=dataset_budgets(session, tenant.id),
    )


@router.post("/budget", response_model=BudgetChangePublic, status_code=status.HTTP_201_CREATED)
def set_budget(
    body: BudgetChangeRequest, caller: AdminCaller, session: SessionDep
) -> BudgetChangePublic:
    """Set the tenant's (or one dataset's) epsilon budget; the change is recorded."""
    try:
        change = change_budget(
            session,
            tenant=caller.tenant,
            new_epsilon=body.epsilon,
            actor=f"admin key {caller.key.prefix}",
            reason=body.reason,
            dataset=body.dataset or TENANT_WIDE,
        )
    except BudgetError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    session.commit()
    return BudgetChangePublic.model_validate(change, from_attributes=True)


@router.get("/budget/changes", response_model=list[BudgetChangePublic])
def list_budget_changes(caller: AdminCaller, session: SessionDep) -> list[BudgetChangePublic]:
    return [
        BudgetChangePublic.model_validate(c, from_attributes=True)
        for c in budget_changes(session, caller.tenant.id)
    ]


@router.get(
    "/ledger",
    response_model=list[LedgerEntryPublic],
    responses={200: {"content": {"application/x-ndjson": {}, "text/csv": {}}}},
)
def ledger(
    caller: AdminCaller,
    session: SessionDep,
    format: Annotated[Literal["json", "jsonl", "csv"], Query()] = "json",
) -> list[LedgerEntryPublic] | Response:
    """The tenant's ledger: JSON (default), JSON Lines or CSV for auditors (docs/AUDIT.md)."""
    events = tenant_events(session, caller.tenant.id)
    if format == "json":
        return [LedgerEntryPublic.model_validate(e, from_attributes=True) for e in events]
    name = f"fedtext-ledger-{caller.tenant.name}.{format}"
    return StreamingResponse(
        iter_jsonl(events) if format == "jsonl" else iter_csv(events),
        media_type="application/x-ndjson" if format == "jsonl" else "text/csv",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


@router.get(
    "/report",
    response_model=PrivacyReportPublic,
    responses={200: {"content": {"text/html": {}}}},
)
def report(
    caller: AdminCaller,
    session: SessionDep,
    format: Annotated[Literal["json", "html"], Query()] = "json",
) -> PrivacyReportPublic | Response:
    """The audit report: budget, spend per run and round, chain check, methodology."""
    tenant = caller.tenant
    built = build_report(
        session,
        tenant_id=tenant.id,
        tenant_name=tenant.name,
        budget_epsilon=tenant.budget_epsilon,
        delta=tenant.budget_delta,
    )
    if format == "html":
        return HTMLResponse(render_html(built))
    return PrivacyReportPublic.model_validate(built.model_dump())
