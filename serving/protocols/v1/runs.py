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

import hashlib
import json
import logging
import math
import threading
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, status
from sqlmodel import Session, and_, col, or_, select

from privacy.budget import BudgetDecision
from privacy.evaluation import DEFAULT_EVAL_NOISE
from privacy.gate import PrivacyGate, estimate_releases, largest_target
from privacy.ledger import TENANT_WIDE, PrivacyEvent, tenant_events
from privacy.reservations import ESTIMATE, outstanding
from runs.lifecycle import (
    active_run_ids,
    cancel_run,
    end_run,
    new_run,
    request_cancel,
    withdraw_cancel,
)
from runs.status import RunStatus
from serving.limits import TokenBuckets
from serving.protocols.v1.deps import (
    AdminCaller,
    Credential,
    OptionalRunLauncherDep,
    PlatformDep,
    RunLauncherDep,
    SessionDep,
)
from serving.schemas import ReleasedMetrics, RoundMetricPublic, RunCreate, RunPublic
from tenancy.checkpoints import drop_checkpoint
from tenancy.governance import Policy, below_floor, get_policy, live_tenant
from tenancy.tables import RoundMetric, Tenant, TrainingRun
from tenancy.tenants import live_tenants, without_consent

router = APIRouter(prefix="/v1/runs", tags=["runs"])
log = logging.getLogger("fedtext.serving.runs")


def _public(session: Session, run: TrainingRun, tenant_id: str) -> RunPublic:
    config = json.loads(run.simulation_json or "{}")
    # What ran (a federation run records its settings at start) over what was asked.
    ran = {**config, **json.loads(run.config_json or "{}")}
    user_unit = ran.get("privacy_unit") == "user"
    tenant = session.get(Tenant, tenant_id)
    summary = json.loads(run.summary_json or "{}").get("tenants", {})
    own = summary.get(tenant.name) if tenant is not None else None
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
        metrics=[_with_uncertainty(m, own) for m in metrics],
        result=ReleasedMetrics.from_metrics(own) if own else None,
        privacy_unit="user" if user_unit else "example",
        max_examples_per_user=int(ran.get("max_examples_per_user", 1)) if user_unit else None,
    )


def _with_uncertainty(row: RoundMetric, own: dict[str, Any] | None) -> RoundMetricPublic:
    """A round row; the final phase's released figures get their SD and 95% interval from
    the run summary (the global model's on "evaluate", the personalized one's on
    "personalize")."""
    public = RoundMetricPublic.model_validate(row, from_attributes=True)
    prefix = {"evaluate": "global_", "personalize": "personalized_"}.get(row.phase)
    if own is None or prefix is None:
        return public
    extra = {
        f"{m}{sfx}": own.get(f"{prefix}{m}{sfx}")
        for m in ("accuracy", "macro_f1")
        for sfx in ("_sd", "_low", "_high")
    }
    return public.model_copy(update={**extra, "examples_sd": own.get("test_examples_sd")})


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


# Planning (noise searches, budget compositions) is CPU work: at most PLANNING_SLOTS
# submissions plan at once, and one that waits longer than PLANNING_WAIT_S is answered
# 503 with Retry-After, so a flood of run requests cannot starve other tenants'
# predictions (finding 7 of issue 24; bench/partner_load.py measures it).
PLANNING_SLOTS = 1
PLANNING_WAIT_S = 2.0
_planning = threading.BoundedSemaphore(PLANNING_SLOTS)
# A tenant starts runs now and then: beyond SUBMISSIONS_PER_SECOND (bursts of
# SUBMISSION_BURST) its run requests are answered 429 before any database or privacy
# work, so one admin key cannot keep the planner (and the process) busy.
SUBMISSIONS_PER_SECOND = 1.0
SUBMISSION_BURST = 10
_submissions = TokenBuckets(SUBMISSIONS_PER_SECOND, SUBMISSION_BURST, max_buckets=100_000)


_key_submissions = TokenBuckets(SUBMISSIONS_PER_SECOND, SUBMISSION_BURST, max_buckets=100_000)


def _too_many(who: str, wait: float) -> HTTPException:
    return HTTPException(
        status.HTTP_429_TOO_MANY_REQUESTS,
        f"Too many run requests from {who}: at most {SUBMISSIONS_PER_SECOND:g} per second "
        f"(bursts of {SUBMISSION_BURST}).",
        headers={"Retry-After": str(max(1, math.ceil(wait)))},
    )


async def _key_allowed(credential: Credential) -> None:
    # Per credential first, before the key is looked up: a flood from one key is answered
    # without a database query or a thread hop (the tenant's own limit follows).
    if credential is not None:
        digest = hashlib.sha256(credential.encode()).hexdigest()[:32]
        wait = _key_submissions.take(digest)
        if wait > 0:
            raise _too_many("this key", wait)


async def _submission_allowed(caller: AdminCaller) -> None:
    wait = _submissions.take(caller.tenant.id)
    if wait > 0:
        raise _too_many(f"tenant {caller.tenant.name!r}", wait)


KeyAllowed = Annotated[None, Depends(_key_allowed)]
SubmissionAllowed = Annotated[None, Depends(_submission_allowed)]


def _not_a_partner(names: list[str], caller: str) -> HTTPException:
    # Unknown tenants and tenants that have not agreed get one answer: no enumeration.
    return HTTPException(
        status.HTTP_403_FORBIDDEN,
        "; ".join(f"tenant {n!r} cannot take part (not a partner)" for n in names)
        + f": a tenant takes part in runs of {caller!r} only once its admin lists "
        f"{caller!r} with PUT /v1/partners.",
    )


@router.post("", response_model=RunPublic, status_code=status.HTTP_202_ACCEPTED)
def create(
    body: RunCreate,
    _key: KeyAllowed,
    _: SubmissionAllowed,
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

    Each participant's own policy applies (``GET /v1/policy``): a run below a
    participant's floor is refused (422, naming the setting); the deploy policy that
    applies to each tenant is the stricter of its own and the run's. Refusals show the
    caller its own figures and only "tenant X cannot take part (reason)" for others.
    """
    names = [caller.tenant.name]
    for name in body.participants:
        if name in names:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT, f"Tenant {name!r} is named twice."
            )
        names.append(name)
    if len(names) < 2:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            "A federation needs at least two tenants: name at least one participant.",
        )
    found, missing = live_tenants(session=session, names=names)
    refused = without_consent(
        session=session, owner_id=caller.tenant.id, participants=list(found.values())
    )
    if missing or refused:
        # A run spends each participant's budget (and trains on its data): its admin decides.
        raise _not_a_partner(sorted({*missing, *refused}), caller.tenant.name)
    tenants = list(found.values())
    policies = {t.id: get_policy(session=session, tenant_id=t.id) for t in tenants}
    floors = []
    for t in tenants:
        low = below_floor(
            policies[t.id], secure_mode=body.secure_mode, epsilon=body.epsilon, family=body.model
        )
        if low and t.id == caller.tenant.id:
            # The caller's own floor alone: partners' floors are not probed by a run that
            # could not start anyway.
            floors = [f"your tenant's policy (GET /v1/policy) does not allow: {', '.join(low)}"]
            break
        if low:
            floors.append(f"tenant {t.name!r} cannot take part (policy: {', '.join(low)})")
    if floors:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "; ".join(floors) + ".")
    config = {**body.settings(), "tenants": names}
    if not _planning.acquire(timeout=PLANNING_WAIT_S):
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "Too many run requests are being planned; retry shortly.",
            headers={"Retry-After": "2"},
        )
    try:
        run = new_run(owner_tenant_id=caller.tenant.id, simulation_json=json.dumps(config))
        # The budget first, unlocked: its estimate is a closed form, so a run that cannot
        # fit is refused before the launcher's check searches noise levels for it, and no
        # tenant's lock is held during that search.
        for hold in (False, True):
            refusals = _reserve_budgets(
                session, run.id, tenants, body, caller.tenant.id, policies, hold=hold
            )
            if refusals:
                session.rollback()
                raise HTTPException(status.HTTP_409_CONFLICT, "; ".join(refusals))
            if not hold:
                session.rollback()  # end the read transaction before the slow check
                try:
                    launcher.check(config)
                except ValueError as exc:
                    raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
        session.add(run)
        session.commit()  # the run and its reservations together, then the locks are released
    finally:
        _planning.release()
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
    session: Session,
    run_id: str,
    tenants: list[Tenant],
    body: RunCreate,
    caller_id: str,
    policies: dict[str, Policy],
    *,
    hold: bool = True,
) -> list[str]:
    """Reserve (``hold``; else only check) the run's estimated spend of every participant
    through the privacy gate, or say who it does not fit: the caller's own figures (with
    the largest epsilon that fits and how to raise the budget), and only "cannot take part
    (budget)" for others.

    Tenants are locked in id order, so two submissions never deadlock; each is checked
    against spent + other active runs' reservations + this run's target epsilon and
    evaluation release, on the dataset its admin declared. The reservations commit with
    the run. Planning replaces the estimate with the exact releases and checks again.
    """
    gate = PrivacyGate(load_tenant=live_tenant, active_runs=active_run_ids)
    refusals: list[str] = []
    for tenant in sorted(tenants, key=lambda t: t.id):
        dataset = policies[tenant.id].dataset
        estimate = estimate_releases(body.epsilon, tenant.budget_delta, DEFAULT_EVAL_NOISE)
        if hold:
            result = gate.hold(
                session,
                tenant_id=tenant.id,
                run_id=run_id,
                dataset=dataset,
                releases=estimate,
                stage=ESTIMATE,
            )
        else:
            # A first answer without the lock, from the largest epsilon that fits this
            # tenant's budget state (cached): no composition per request (``hold`` decides).
            fit = gate.largest_estimate(
                session,
                tenant_id=tenant.id,
                run_id=run_id,
                dataset=dataset,
                eval_noise=DEFAULT_EVAL_NOISE,
            )
            if body.epsilon <= fit:
                continue
            if tenant.id != caller_id:
                refusals.append(f"tenant {tenant.name!r} cannot take part (budget)")
                continue
            result = gate.peek(
                session, tenant_id=tenant.id, run_id=run_id, dataset=dataset, releases=estimate
            )
        if result.allowed:
            continue
        if tenant.id != caller_id or result.decision is None:
            refusals.append(f"tenant {tenant.name!r} cannot take part (budget)")
            continue
        # The caller's own refusal alone: a run its own budget refuses says nothing about
        # the partners (else a caller shrinking its own budget probes theirs for free).
        return [_own_refusal(session, tenant, dataset, result.decision)]
    return refusals


def _own_refusal(session: Session, tenant: Tenant, dataset: str, decision: BudgetDecision) -> str:
    """The caller's own budget refusal: its figures, the largest epsilon that fits now, and
    how its budget is raised."""
    text = (
        "The run does not fit what is left of your budget after other runs' "
        f"reservations: tenant {tenant.name!r} {decision.reason}"
    )
    if decision.tampered:
        return text
    scope = None if decision.scope == TENANT_WIDE else decision.scope
    held = [e.params() for e in tenant_events(session, tenant.id, scope)]
    others = outstanding(session, tenant.id, active_runs=active_run_ids(session))
    held += [p for d, p in others if scope is None or d == scope]
    fits = largest_target(
        held, budget=decision.budget, delta=decision.delta, eval_noise=DEFAULT_EVAL_NOISE
    )
    what = "budget" if scope is None else f"budget of dataset {scope!r}"
    advice = f"the largest epsilon that fits now is {fits:g}" if fits > 0 else "no epsilon fits now"
    return (
        f"{text}. {advice.capitalize()}; to raise the {what}, an admin calls POST "
        "/v1/privacy/budget"
        + (f' with "dataset": "{scope}"' if scope else "")
        + " (or the operator runs `fedtext tenant budget "
        + f"{tenant.name} --epsilon E --reason R"
        + (f" --dataset {scope}" if scope else "")
        + "`)."
    )


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
    dispatched stay charged to the ledger. The run is recorded cancelled, with who asked,
    whatever ends its worker meanwhile; a cancelled run is final (never resumed) and its
    checkpoint is dropped."""
    run = _own_run(session, run_id, caller.tenant.id)
    if RunStatus(run.status).finished:
        raise HTTPException(status.HTTP_409_CONFLICT, f"Run {run_id} is already {run.status}.")
    if launcher is None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, "This server cannot stop run workers."
        )
    by = f"admin key {caller.key.prefix}"
    # Who cancels is written before the worker is stopped: an end recorded while it stops
    # (the reaper finding it gone, the worker failing) then records the cancel too.
    if not request_cancel(platform.engine, run.id, by):
        session.refresh(run)
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"Run {run_id} is already {run.status}"
            + (" (a cancel is in progress)." if run.cancelled_by else "."),
        )
    try:
        launcher.cancel(run.id, run.worker_pid)
    except OSError as exc:  # the federation did not confirm the stop: the run goes on
        withdraw_cancel(platform.engine, run.id)
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None
    cancel_run(platform.engine, run.id, by)
    session.refresh(run)
    if run.status == RunStatus.CANCELLED:  # not a run that completed meanwhile (a kept head)
        drop_checkpoint(platform.engine, platform.store, run.id)
        session.refresh(run)
    log.info("run cancelled", extra={"fields": {"run": run.id, "tenant": caller.tenant.id}})
    return _public(session, run, caller.tenant.id)
