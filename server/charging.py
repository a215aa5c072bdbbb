"""What each tenant may spend: its plan, reserved against its budgets before round 1 (and
again when a run resumes), and the charge written to the ledger before each dispatch."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable

from sqlmodel import Session

from models import ModelSpec
from privacy.budget import check_budget
from privacy.gate import PrivacyGate
from privacy.params import DPParams
from privacy.schemas import DEFAULT_DATASET
from runs.lifecycle import active_run_ids, get_run
from runs.spec import RunSpec
from server.discovery import NodeInfo, participating, unique_known_tenants
from server.planning import PlanRefused, TenantPlan, plan_tenant
from server.strategy import ChargeFn
from tenancy.db import session_scope
from tenancy.governance import Policy, below_floor, get_policy, live_tenant, stricter_deploy
from tenancy.platform import Platform
from tenancy.tables import Tenant, TrainingRun
from tenancy.tenants import without_consent

log = logging.getLogger("fedtext.server")


def privacy_gate() -> PrivacyGate:
    """The gate over the platform's tables: a tenant is gone once deleted; a run's
    reservations hold while it is active."""
    return PrivacyGate(load_tenant=live_tenant, active_runs=active_run_ids)


def cannot_take_part(tenant_name: str, why: str) -> str:
    """What a refusal says of a tenant: its name and the kind of reason, none of its
    figures (a run's error is read by every admin it concerns)."""
    return f"tenant {tenant_name!r} cannot take part ({why})"


def applied_settings(
    cfg: RunSpec, *, owner: str, deploy: str, dataset: str, declared_by: str
) -> str:
    """The settings that applied to one tenant, as recorded on its ledger entries."""
    return json.dumps(
        {
            "secure_mode": cfg.secure_mode,
            "deploy": deploy,
            "model": cfg.model,
            "epsilon": cfg.epsilon,
            "owner": owner,
            "dataset": dataset,
            "dataset_declared_by": declared_by,
            # privacy-unit user (issue 29): the unit and its bound k on every entry.
            **(
                {"privacy_unit": "user", "max_examples_per_user": cfg.max_examples_per_user}
                if cfg.privacy_unit == "user"
                else {}
            ),
        },
        sort_keys=True,
        separators=(",", ":"),
    )


def _owner(session: Session, run: TrainingRun | None) -> str:
    if run is None or run.owner_tenant_id is None:
        return "operator (CLI or federation)"
    owner = session.get(Tenant, run.owner_tenant_id)
    return f"tenant {owner.name}" if owner is not None else "a deleted tenant"


def _unconsented(session: Session, run: TrainingRun | None, tenants: list[Tenant]) -> set[str]:
    """Names of ``tenants`` whose (signed) consent the run's owner lacks, asked again here
    and not only when the run was requested: the stored request is not signed, so a
    participant written into it around the API must not be planned or charged. An
    operator's run (no owner: CLI, federation) needs no consent."""
    if run is None or run.owner_tenant_id is None:
        return set()
    return set(without_consent(session=session, owner_id=run.owner_tenant_id, participants=tenants))


def charged_dataset(node: NodeInfo, policy: Policy, *, simulated: bool) -> tuple[str, str]:
    """The dataset a tenant's charges land on, and who declared it: its node (federation,
    covered by the node's enrolled key) or its admin's policy (simulation, where the
    platform itself makes the virtual nodes). Never the run creator's label."""
    if simulated:
        return policy.dataset, "tenant policy"
    return node.dataset, f"node {node.node_id}"


def plan_run(
    platform: Platform, nodes: list[NodeInfo], cfg: RunSpec, *, simulated: bool = False
) -> tuple[dict[int, TenantPlan], list[str]]:
    """One plan per eligible node, each reserved against its tenant's budget through the
    privacy gate; every refusal comes with its kind of reason (no tenant's figures).

    A tenant is refused when the run is below its floor (policy: the setting), when its
    data cannot meet the run's settings (plan) or when the run does not fit its budget
    (budget); the details go to the coordinator's log, not to the run's error.
    """
    plans: dict[int, TenantPlan] = {}
    gate = privacy_gate()
    with Session(platform.engine) as session:
        nodes, outsiders = participating(nodes, cfg.participants)
        found, refused = unique_known_tenants(session, nodes)
        run = get_run(platform.engine, cfg.run_id)
        owner = _owner(session, run)
        policies = {t.id: get_policy(session=session, tenant_id=t.id) for _, t in found}
        unconsented = _unconsented(session, run, [t for _, t in found])
    refused = outsiders + refused
    for node, found_tenant in found:
        if found_tenant.name in unconsented:
            refused.append(cannot_take_part(found_tenant.name, "not a partner"))
            continue
        policy = policies[found_tenant.id]
        low = below_floor(
            policy, secure_mode=cfg.secure_mode, epsilon=cfg.epsilon, family=cfg.model
        )
        if low:
            refused.append(cannot_take_part(found_tenant.name, f"policy: {', '.join(low)}"))
            continue
        dataset, declared_by = charged_dataset(node, policy, simulated=simulated)
        deploy = stricter_deploy(policy.deploy, cfg.deploy)
        try:
            plan = plan_tenant(
                tenant_id=found_tenant.id,
                tenant_name=found_tenant.name,
                node_id=node.node_id,
                num_train=node.num_train,
                num_test=node.num_test,
                target_epsilon=cfg.epsilon,
                delta=found_tenant.budget_delta,
                clip_norm=cfg.clip_norm,
                batch_size=cfg.batch_size,
                local_epochs=cfg.local_epochs,
                rounds=cfg.rounds,
                budget_epsilon=math.inf,  # the gate below decides the budget
                spent_events=[],
                personalize_epochs=cfg.personalize_epochs,
                eval_noise=cfg.eval_noise,
                privacy_unit=cfg.privacy_unit,
                max_examples_per_user=cfg.max_examples_per_user,
            )
        except PlanRefused as exc:
            log.warning("run %s: %s", cfg.run_id, exc)
            why = "plan: its data cannot meet the run's settings"
            refused.append(cannot_take_part(found_tenant.name, why))
            continue
        with session_scope(platform.engine) as session:
            result = gate.hold(
                session,
                tenant_id=found_tenant.id,
                run_id=cfg.run_id,
                dataset=dataset,
                releases=plan.releases(),
                stage="plan",
            )
        if result.gone:
            refused.append(cannot_take_part(found_tenant.name, "gone"))
            continue
        assert result.decision is not None
        if not result.allowed:
            log.warning("run %s: tenant %s refused: %s", cfg.run_id, found_tenant.name,
                        result.decision.reason)  # fmt: skip
            refused.append(cannot_take_part(found_tenant.name, "budget"))
            continue
        applied = applied_settings(
            cfg, owner=owner, deploy=deploy, dataset=dataset, declared_by=declared_by
        )
        plans[node.node_id] = dataclasses.replace(
            plan, budget=result.decision, dataset=dataset, applied_json=applied, deploy=deploy
        )
    return plans, refused


def reserve_resumed(platform: Platform, cfg: RunSpec, plans: dict[int, TenantPlan]) -> list[str]:
    """Hold again what a resumed run has left to charge; refuse tenants it no longer fits."""
    refused = []
    gate = privacy_gate()
    with Session(platform.engine) as session:
        tenants = [t for p in plans.values() if (t := session.get(Tenant, p.tenant_id))]
        unconsented = _unconsented(session, get_run(platform.engine, cfg.run_id), tenants)
    for node_id, plan in list(plans.items()):
        if plan.tenant_name in unconsented:
            del plans[node_id]
            refused.append(cannot_take_part(plan.tenant_name, "not a partner"))
            continue
        with session_scope(platform.engine) as session:
            result = gate.hold(
                session,
                tenant_id=plan.tenant_id,
                run_id=cfg.run_id,
                dataset=plan.dataset,
                releases=plan.releases(),
                stage="plan",
            )
        if result.allowed:
            continue
        del plans[node_id]
        if result.gone:
            refused.append(cannot_take_part(plan.tenant_name, "gone"))
        else:
            assert result.decision is not None
            log.warning("run %s: tenant %s refused on resume: %s", cfg.run_id,
                        plan.tenant_name, result.decision.reason)  # fmt: skip
            refused.append(cannot_take_part(plan.tenant_name, "budget"))
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
            "dataset": p.dataset,
            "applied": p.applied_json,
            "deploy": p.deploy,
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
            log.warning("tenant %s now has %d examples, planned %d", name, node.num_train,
                        p["num_train"])  # fmt: skip
            refused.append(cannot_take_part(name, "plan: its data changed since planning"))
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
            p.get("dataset", DEFAULT_DATASET),
            p.get("applied", "{}"),
            p.get("deploy", "if-better"),
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
) -> ChargeFn:
    """Write each tenant's charge before dispatch through the privacy gate; refuse a
    tenant now over its budget (or over the budget of the dataset its plan charges).

    Each tenant's check and append run in one transaction holding its ledger head, and
    the check counts the other active runs' reservations: two runs charging one tenant
    at once are serialized, and the second sees the first's charge. A phase with several
    releases (personalization and its evaluation) charges all of them or none. Each
    entry records the settings that applied to its tenant (``TenantPlan.applied_json``).
    """
    gate = privacy_gate()

    def charge(server_round: int, plans: list[TenantPlan]) -> list[TenantPlan]:
        allowed = []
        for plan in plans:
            releases = _as_releases(params_of(plan))
            if not releases:
                continue
            with session_scope(platform.engine) as session:
                result = gate.charge(
                    session,
                    tenant_id=plan.tenant_id,
                    run_id=run_id,
                    round=server_round,
                    releases=releases,
                    dataset=plan.dataset,
                    spec_sha256=spec.sha256(),
                    applied=json.loads(plan.applied_json),
                )
            if result.gone:
                log.error("round %d: tenant %s is gone; not dispatched", server_round,
                          plan.tenant_name)  # fmt: skip
                continue
            if not result.allowed:
                assert result.decision is not None
                log.error("round %d: %s not dispatched: %s", server_round, plan.tenant_name,
                          result.decision.reason)  # fmt: skip
                continue
            allowed.append(plan)
        return allowed

    return charge
