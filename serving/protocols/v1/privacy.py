"""Privacy routes: budget (read and change), ledger export, audit report.

No route updates or deletes a ledger entry; changing a budget appends to the
tenant's budget chain.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, status
from fastapi.responses import HTMLResponse, Response, StreamingResponse

from privacy.accounting import DEFAULT_ACCOUNTANT, compose_epsilon
from privacy.budget import BudgetError, change_budget, dataset_budgets
from privacy.export import iter_csv, iter_jsonl
from privacy.heads import platform_signer, sign_and_store
from privacy.ledger import TENANT_WIDE, budget_changes, lock_tenant, tenant_events
from privacy.report import signed_report
from privacy.report_html import render_html
from privacy.reservations import outstanding
from privacy.schemas import SignedHeadPublic
from runs.lifecycle import active_run_ids
from serving.protocols.v1.deps import AdminCaller, ConfigDep, PlatformDep, SessionDep
from serving.refusals import refusal_for
from serving.schemas import (
    BudgetChangePublic,
    BudgetChangeRequest,
    BudgetPublic,
    LedgerEntryPublic,
    PrivacyReportPublic,
)
from tenancy.signing import SigningHistory

router = APIRouter(prefix="/v1/privacy", tags=["privacy"])


@router.get("/budget", response_model=BudgetPublic)
def budget(caller: AdminCaller, session: SessionDep) -> BudgetPublic:
    """Spent (charged releases), reserved (active runs' uncharged planned releases) and
    remaining (what a new run may still plan), all composed at the tenant's delta."""
    tenant = caller.tenant
    events = [e.params() for e in tenant_events(session, tenant.id)]
    held = [p for _, p in outstanding(session, tenant.id, active_runs=active_run_ids(session))]
    spent = compose_epsilon(events, tenant.budget_delta, DEFAULT_ACCOUNTANT)
    committed = compose_epsilon([*events, *held], tenant.budget_delta, DEFAULT_ACCOUNTANT)
    return BudgetPublic(
        tenant=tenant.name,
        budget_epsilon=tenant.budget_epsilon,
        delta=tenant.budget_delta,
        spent_epsilon=spent,
        spent_epsilon_rdp=compose_epsilon(events, tenant.budget_delta, "rdp"),
        reserved_epsilon=committed - spent,
        reserved_releases=len(held),
        remaining_epsilon=max(0.0, tenant.budget_epsilon - committed),
        accountant=DEFAULT_ACCOUNTANT,
        events=len(events),
        dataset_budgets=dataset_budgets(session, tenant.id),
    )


@router.post("/budget", response_model=BudgetChangePublic, status_code=status.HTTP_201_CREATED)
def set_budget(
    body: BudgetChangeRequest, caller: AdminCaller, session: SessionDep, config: ConfigDep
) -> BudgetChangePublic:
    """Set the tenant's (or one dataset's) epsilon budget; the change is recorded."""
    lock_tenant(session, caller.tenant.id)  # not between a run's budget check and its charge
    if caller.tenant in session:
        session.refresh(caller.tenant)
    try:
        change = change_budget(
            session,
            tenant=caller.tenant,
            new_epsilon=body.epsilon,
            actor=f"admin key {caller.key.prefix}",
            reason=body.reason,
            dataset=body.dataset or TENANT_WIDE,
            max_epsilon=config.max_budget_epsilon,
        )
    except BudgetError as exc:
        raise refusal_for(exc) from None
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
    platform: PlatformDep,
    format: Annotated[Literal["json", "html"], Query()] = "json",
) -> PrivacyReportPublic | Response:
    """The audit report: budget, spend per run and round, chain check (against the last
    signed head too), methodology, and a new signed head to keep."""
    tenant = caller.tenant
    built = signed_report(
        session,
        platform.keyring,
        platform.keyring.provider.versions(),
        tenant_id=tenant.id,
        tenant_name=tenant.name,
        budget_epsilon=tenant.budget_epsilon,
        delta=tenant.budget_delta,
    )
    session.commit()
    if format == "html":
        return HTMLResponse(render_html(built))
    return PrivacyReportPublic.model_validate(built.model_dump())


@router.get("/head", response_model=SignedHeadPublic)
def head(caller: AdminCaller, session: SessionDep, platform: PlatformDep) -> SignedHeadPublic:
    """The tenant's chain heads and budget now, signed by the platform (Ed25519): keep it
    with a ledger export and check later ones with `fedtext audit verify --head FILE`."""
    tenant = caller.tenant
    signed = sign_and_store(
        session,
        platform_signer(platform.keyring),
        tenant_id=tenant.id,
        budget_epsilon=tenant.budget_epsilon,
        budget_delta=tenant.budget_delta,
    )
    session.commit()
    return signed


@router.get("/signing-keys", response_model=SigningHistory)
def signing_keys(caller: AdminCaller, platform: PlatformDep) -> SigningHistory:
    """The platform's public signing keys (Ed25519), each endorsed by the one before:
    pin them, and check the ledger, budget changes, key rows and heads against them with
    `fedtext audit verify --keys FILE`. A KEK rotation does not change them."""
    del caller  # any tenant admin (or the auditor it gives them to) may fetch them
    return platform.keyring.signing.history(refresh=True)
