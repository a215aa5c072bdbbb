"""What each tenant may spend: its plan, reserved against its budgets before round 1 (and
again when a run resumes), and the charge written to the ledger before each dispatch."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable

from sqlmodel import Session

from models import ModelSpec
from privacy.budget import check_budget, check_release
from privacy.ledger import DEFAULT_DATASET, lock_tenant, record_event, tenant_events
from privacy.params import DPParams
from privacy.reservations import outstanding, reserve, uncharged
from runs.lifecycle import active_run_ids
from runs.spec import RunSpec
from server.discovery import NodeInfo, participating, unique_known_tenants
from server.planning import PlanRefused, TenantPlan, plan_tenant
from server.strategy import ChargeFn
from tenancy.db import session_scope
from tenancy.platform import Platform
from tenancy.tables import Tenant

log = logging.getLogger("fedtext.server")


def plan_run(
    platform: Platform, nodes: list[NodeInfo], cfg: RunSpec
) -> tuple[dict[int, TenantPlan], list[str]]:
    """One plan per eligible node, each reserved against its tenant's budget; every
    refusal comes with its reason.

    Each tenant is planned inside ``lock_tenant``: the budget check counts other runs'
    reservations, and this run's exact releases replace its submission estimate in the
    same transaction, so no concurrent run can take the budget between check and hold.
    """
    plans: dict[int, TenantPlan] = {}
    with Session(platform.engine) as session:
        nodes, outsiders = participating(nodes, cfg.participants)
        found, refused = unique_known_tenants(session, nodes)
    refused = outsiders + refused
    for node, found_tenant in found:
        with session_scope(platform.engine) as session:
            lock_tenant(session, found_tenant.id)
            tenant = session.get(Tenant, found_tenant.id, populate_existing=True)
            assert tenant is not None
            others = outstanding(
                session, tenant.id, active_runs=active_run_ids(session), exclude_run=cfg.run_id
            )
            try:
                plan = plan_tenant(
                    tenant_id=tenant.id,
                    tenant_name=tenant.name,
                    node_id=node.node_id,
                    num_train=node.num_train,
                    num_test=node.num_test,
                    target_epsilon=cfg.epsilon,
                    delta=tenant.budget_delta,
                    clip_norm=cfg.clip_norm,
                    batch_size=cfg.batch_size,
                    local_epochs=cfg.local_epochs,
                    rounds=cfg.rounds,
                    budget_epsilon=tenant.budget_epsilon,
                    spent_events=[e.params() for e in tenant_events(session, tenant.id)],
                    personalize_epochs=cfg.personalize_epochs,
                    eval_noise=cfg.eval_noise,
                    reserved_events=[p for _, p in others],
                )
            except PlanRefused as exc:
                refused.append(str(exc))
                continue
            # The budget of record (its chain) and a dataset's own budget decide too.
            decision = check_release(
                session,
                tenant=tenant,
                dataset=cfg.dataset,
                new_events=[r.params for r in plan.releases()],
                reserved=others,
            )
            if not decision.allowed:
                refused.append(f"tenant {tenant.name!r} refused: {decision.reason}")
                continue
            reserve(
                session,
                run_id=cfg.run_id,
                tenant_id=tenant.id,
                dataset=cfg.dataset,
                releases=plan.releases(),
                stage="plan",
            )
            plans[node.node_id] = plan
    return plans, refused


def reserve_resumed(platform: Platform, cfg: RunSpec, plans: dict[int, TenantPlan]) -> list[str]:
    """Hold again what a resumed run has left to charge; refuse tenants it no longer fits."""
    refused = []
    for node_id, plan in list(plans.items()):
        with session_scope(platform.engine) as session:
            lock_tenant(session, plan.tenant_id)
            tenant = session.get(Tenant, plan.tenant_id, populate_existing=True)
            if tenant is None or tenant.deleted_at is not None:
                del plans[node_id]
                refused.append(f"tenant {plan.tenant_name!r} is gone")
                continue
            row = reserve(
                session,
                run_id=cfg.run_id,
                tenant_id=tenant.id,
                dataset=cfg.dataset,
                releases=plan.releases(),
                stage="plan",
            )
            others = outstanding(
                session, tenant.id, active_runs=active_run_ids(session), exclude_run=cfg.run_id
            )
            left = [r.params for r in uncharged(session, row)]
            decision = check_release(
                session, tenant=tenant, dataset=cfg.dataset, new_events=left, reserved=others
            )
            if not decision.allowed:
                session.delete(row)
                del plans[node_id]
                refused.append(f"tenant {tenant.name!r} refused: {decision.reason}")
    return refused


def plans_to_json(plans: dict[int, TenantPlan]) -> str:
    out = {}
    for p in plans.values():
        out[p.tenant_name] = {
            "tenant_id": p.tenant_id,
            "num_train": p.num_train,
            "num_test": p.num_test,
            "round": dataclasses.asdict(p.round_params),
            "personal": dataclasses.asdict(p.personal_params) if p.personal_params else None,
            "evaluation": dataclasses.asdict(p.eval_params) if p.eval_params else None,
            "run_epsilon": p.run_epsilon,
            "budget_reason": p.budget.reason,
        }
    return json.dumps(out, sort_keys=True)


def plans_from_json(
    text: str, nodes: list[NodeInfo], rounds: int
) -> tuple[dict[int, TenantPlan], list[str]]:
    """The stored plans of a run mapped onto the nodes that reconnected."""
    stored = json.loads(text)
    plans, refused = {}, []
    by_tenant = {n.tenant: n for n in nodes}
    for name, p in stored.items():
        node = by_tenant.get(name)
        if node is None:
            refused.append(f"tenant {name!r} has no connected node")
            continue
        if node.num_train != p["num_train"]:
            refused.append(
                f"tenant {name!r} now has {node.num_train} examples, planned {p['num_train']}"
            )
            continue
        budget = check_budget([], [], budget_epsilon=float("inf"), delta=p["round"]["delta"])
        plans[node.node_id] = TenantPlan(
            p["tenant_id"],
            name,
            node.node_id,
            node.num_train,
            node.num_test,
            DPParams(**p["round"]),
            rounds,
            dataclasses.replace(budget, requested=p["run_epsilon"]),
            DPParams(**p["personal"]) if p["personal"] else None,
            DPParams(**p["evaluation"]) if p.get("evaluation") else None,
        )
    return plans, refused


# The releases a phase charges per tenant: (purpose, params); a bare DPParams is "train".
ParamsOf = Callable[[TenantPlan], "DPParams | list[tuple[str, DPParams]] | None"]


def _as_releases(value: DPParams | list[tuple[str, DPParams]] | None) -> list[tuple[str, DPParams]]:
    if value is None:
        return []
    if isinstance(value, DPParams):
        return [("train", value)]
    return list(value)


def make_charge(
    platform: Platform,
    run_id: str,
    spec: ModelSpec,
    params_of: ParamsOf,
    dataset: str = DEFAULT_DATASET,
) -> ChargeFn:
    """Write each tenant's charge before dispatch; refuse a tenant now over its budget
    (or over the budget of ``dataset``, when that dataset has one).

    Each tenant's check and append run in one transaction holding its ledger head
    (``lock_tenant``), and the check counts the other active runs' reservations: two
    runs charging one tenant at once are serialized, and the second sees the first's
    charge. A phase with several releases (personalization and its evaluation) charges
    all of them or none.
    """

    def charge(server_round: int, plans: list[TenantPlan]) -> list[TenantPlan]:
        allowed = []
        for plan in plans:
            releases = _as_releases(params_of(plan))
            if not releases:
                continue
            with session_scope(platform.engine) as session:
                lock_tenant(session, plan.tenant_id)
                tenant = session.get(Tenant, plan.tenant_id, populate_existing=True)
                if tenant is None or tenant.deleted_at is not None:
                    log.error(
                        "round %d: tenant %s is gone; not dispatched",
                        server_round,
                        plan.tenant_name,
                    )
                    continue
                others = outstanding(
                    session, tenant.id, active_runs=active_run_ids(session), exclude_run=run_id
                )
                decision = check_release(
                    session,
                    tenant=tenant,
                    dataset=dataset,
                    new_events=[p for _, p in releases],
                    reserved=others,
                )
                if not decision.allowed:
                    log.error(
                        "round %d: %s not dispatched: %s",
                        server_round,
                        plan.tenant_name,
                        decision.reason,
                    )
                    continue
                for purpose, params in releases:
                    record_event(
                        session,
                        tenant_id=tenant.id,
                        run_id=run_id,
                        round=server_round,
                        params=params,
                        spec_sha256=spec.sha256(),
                        dataset=dataset,
                        purpose=purpose,
                    )
                allowed.append(plan)
        return allowed

    return charge
