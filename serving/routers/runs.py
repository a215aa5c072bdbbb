"""Training runs (admin): start one, follow it, cancel it.

The tenant that creates a run is its owner and the only tenant that sees it (a run started
from the command line has no owner: the admins of the tenants it charged see it); the run
trains the caller together with the tenants it names (``participants``), which must
exist and must have agreed (each one's admin lists the caller with ``PUT /v1/partners``:
a run spends the participant's privacy budget and, on a federation, trains on its data).
Each participant's privacy budget is still gated by the ServerApp before round 1.
Metrics shown are the caller's own: another tenant's accuracy is not the caller's to read.

Where it runs is the server's choice: a simulated federation on this machine, or, when
the server has a SuperLink (``FEDTEXT_SUPERLINK``), that federation, whose connected
nodes train on their own data.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status
from sqlmodel import Session, and_, col, or_, select

from privacy.budget import check_release
from privacy.evaluation import DEFAULT_EVAL_NOISE
from privacy.ledger import PrivacyEvent, lock_tenant
from privacy.reservations import ESTIMATE, estimate_releases, outstanding, reserve
from runs.lifecycle import active_run_ids, cancel_run, end_run, new_run
from runs.status import RunStatus
from serving.deps import (
    AdminCaller,
    OptionalRunLauncherDep,
    PlatformDep,
    RunLauncherDep,
    SessionDep,
)
from serving.schemas import RoundMetricPublic, RunCreate, RunPublic
from tenancy.tables import RoundMetric, Tenant, TrainingRun
from tenancy.tenants import live_tenants, without_consent

router = APIRouter(prefix="/v1/runs", tags=["runs"])
log = logging.getLogger("fedtext.serving.runs")


def _public(session: Session, run: TrainingRun, tenant_id: str) -> RunPublic:
    config = json.loads(run.simulation_json or "{}")
    metrics = session.exec(
        select(RoundMetric)
        .where(RoundMetric.run_id == run.id, RoundMetric.tenant_id == tenant_id)
        .order_by(col(RoundMetric.round), col(RoundMetric.phase))
    )
    return RunPublic(
        id=run.id,
        status=RunStatus(run.status),
        participants=list(config.get("tenants", [])),
        rounds=int(config.get("rounds", 0)),
        checkpoint_round=run.checkpoint_round,
        error=run.error,
        created_at=run.created_at,
        finished_at=run.finished_at,
        heartbeat_at=run.heartbeat_at,
        metrics=[RoundMetricPublic.model_validate(m, from_attributes=True) for m in metrics],
    )


def _own_run(session: Session, run_id: str, tenant_id: str) -> TrainingRun:
    run = session.get(TrainingRun, run_id)
    if run is None or run.owner_tenant_id != tenant_id:
        # Another tenant's run and a missing one look the same.
        raise HTTPException(status.HTTP_404_NOT_FOUND, "No such run.")
    return run


def _charged_runs(tenant_id: str) -> Any:
    """Runs that charged this tenant's ledger (a run started from the CLI has no owner;
    its participants' admins see it, as the budget it spent is theirs)."""
    return select(PrivacyEvent.run_id).where(PrivacyEvent.tenant_id == tenant_id).distinct()


def _visible(tenant_id: str) -> Any:
    """The runs a tenant's admin reads: its own, and CLI runs that charged it."""
    return or_(
        TrainingRun.owner_tenant_id == tenant_id,
        and_(
            col(TrainingRun.owner_tenant_id).is_(None),
            col(TrainingRun.id).in_(_charged_runs(tenant_id)),
        ),
    )


def _visible_run(session: Session, run_id: str, tenant_id: str) -> TrainingRun:
    run = session.exec(select(TrainingRun).where(TrainingRun.id == run_id, _visible(tenant_id)))
    found = run.first()
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "No such run.")
    return found


@router.post("", response_model=RunPublic, status_code=status.HTTP_202_ACCEPTED)
def create(
    body: RunCreate,
    caller: AdminCaller,
    session: SessionDep,
    platform: PlatformDep,
    launcher: RunLauncherDep,
) -> RunPublic:
    """Start a run of the caller and ``participants`` in a worker process.

    Simulated (no SuperLink): each tenant is a virtual node on a share of the demo corpus
    (``partitioning``, ``max_train_examples``, ``max_test_examples``).

    On a SuperLink: the run is submitted with ``flwr run``; only the nodes of the caller
    and the participants train, each on its own data file, and the run fails if fewer
    than two of them connect and pass the budget gate. The simulation-only fields do
    not apply there and are refused (422) when given.
    """
    names = [caller.tenant.name]
    for name in body.participants:
        if name in names:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT, f"Tenant {name!r} is named twice."
            )
        names.append(name)
    found, missing = live_tenants(session=session, names=names)
    if missing:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"Unknown tenant(s): {', '.join(missing)}; participants must be existing tenants.",
        )
    if len(names) < 2:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            "A federation needs at least two tenants: name at least one participant.",
        )
    refused = without_consent(
        session=session, owner_id=caller.tenant.id, participants=list(found.values())
    )
    if refused:
        # A run spends each participant's budget (and trains on its data): its admin decides.
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"Tenant(s) {', '.join(refused)} have not agreed to train with "
            f"{caller.tenant.name!r}: each one's admin adds it with PUT /v1/partners.",
        )
    config = {**body.settings(), "tenants": names}
    try:
        launcher.check(config)
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    run = new_run(owner_tenant_id=caller.tenant.id, simulation_json=json.dumps(config))
    refusals = _reserve_budgets(session, run.id, list(found.values()), body)
    if refusals:
        session.rollback()
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            "The run does not fit what is left of the budget after other runs' "
            "reservations: " + "; ".join(refusals),
        )
    session.add(run)
    session.commit()  # the run and its reservations together, then the locks are released
    try:
        launcher.launch(run.id)
    except OSError as exc:
        end_run(platform.engine, run.id, RunStatus.FAILED, f"Could not start: {exc}")
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, "The run's worker could not be started."
        ) from None
    session.refresh(run)
    return _public(session, run, caller.tenant.id)


def _reserve_budgets(
    session: Session, run_id: str, tenants: list[Tenant], body: RunCreate
) -> list[str]:
    """Reserve the run's estimated spend of every participant, or say who it does not fit.

    Each tenant is locked (in id order, so two submissions never deadlock) and checked
    against spent + other active runs' reservations + this run's target epsilon and
    evaluation release; the reservations commit with the run. Planning replaces the
    estimate with the exact releases and checks again.
    """
    refusals = []
    for tenant in sorted(tenants, key=lambda t: t.id):
        lock_tenant(session, tenant.id)
        session.refresh(tenant)
        estimate = estimate_releases(body.epsilon, tenant.budget_delta, DEFAULT_EVAL_NOISE)
        others = outstanding(session, tenant.id, active_runs=active_run_ids(session))
        decision = check_release(
            session,
            tenant=tenant,
            dataset=body.dataset,
            new_events=[r.params for r in estimate],
            reserved=others,
        )
        if not decision.allowed:
            refusals.append(f"tenant {tenant.name!r}: {decision.reason}")
            continue
        reserve(
            session,
            run_id=run_id,
            tenant_id=tenant.id,
            dataset=body.dataset,
            releases=estimate,
            stage=ESTIMATE,
        )
    return refusals


@router.get("", response_model=list[RunPublic])
def list_runs(
    caller: AdminCaller,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> list[RunPublic]:
    rows = session.exec(
        select(TrainingRun)
        .where(_visible(caller.tenant.id))
        .order_by(col(TrainingRun.created_at).desc())
        .limit(limit)
    )
    return [_public(session, r, caller.tenant.id) for r in rows]


@router.get("/{run_id}", response_model=RunPublic)
def get_run(run_id: str, caller: AdminCaller, session: SessionDep) -> RunPublic:
    return _public(session, _visible_run(session, run_id, caller.tenant.id), caller.tenant.id)


@router.post("/{run_id}/cancel", response_model=RunPublic)
def cancel(
    run_id: str,
    caller: AdminCaller,
    session: SessionDep,
    platform: PlatformDep,
    launcher: OptionalRunLauncherDep,
) -> RunPublic:
    """Stop the run's worker (and, on a SuperLink, its Flower run); the rounds already
    dispatched stay charged to the ledger."""
    run = _own_run(session, run_id, caller.tenant.id)
    if RunStatus(run.status).finished:
        raise HTTPException(status.HTTP_409_CONFLICT, f"Run {run_id} is already {run.status}.")
    if launcher is None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, "This server cannot stop run workers."
        )
    try:
        launcher.cancel(run.id, run.worker_pid)
    except OSError as exc:  # the federation did not confirm the stop: the run goes on
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None
    cancel_run(platform.engine, run.id, f"Cancelled by admin key {caller.key.prefix}.")
    session.refresh(run)
    log.info("run cancelled", extra={"fields": {"run": run.id, "tenant": caller.tenant.id}})
    return _public(session, run, caller.tenant.id)
