"""The ServerApp: discover tenants, plan DP, charge rounds, aggregate, personalize, release.

The round loop is ours (so it can checkpoint after every round and resume a killed
run); selection, aggregation and the optional client-level DP wrapper are Flower's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, Strategy
from sqlmodel import Session, col, select

from models import ModelSpec, build_model, load_model_state, load_weights, model_state, save_weights
from privacy.accounting import compose_epsilon
from privacy.budget import check_budget, check_release
from privacy.ledger import DEFAULT_DATASET, record_event, tenant_events
from privacy.ledger import create_tables as create_ledger_tables
from privacy.params import DPParams
from server.checkpoint import load_checkpoint, save_checkpoint
from server.config import ServerRunConfig
from server.planning import PlanRefused, TenantPlan, plan_tenant
from server.strategy import PrivateMixin, check_train_reply, create_strategy, private_part
from tenancy.db import create_tables, session_scope
from tenancy.errors import NotFound
from tenancy.platform import Platform
from tenancy.registry import deployed_version, store_model_version
from tenancy.runs import end_run
from tenancy.tables import RoundMetric, Tenant, TrainingRun, utcnow
from tenancy.tenants import get_tenant

log = logging.getLogger("fedtext.server")


class RunFailed(RuntimeError):
    """The run cannot proceed; the message is for the operator."""


@dataclass
class NodeInfo:
    node_id: int
    tenant: str
    num_train: int
    num_test: int


@dataclass
class RunOutcome:
    run_id: str
    plans: dict[int, TenantPlan]
    refused: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def discover_nodes(grid: Grid, cfg: ServerRunConfig) -> tuple[list[NodeInfo], list[str]]:
    """Ask every connected node which tenant it serves and how much data it holds."""
    deadline = time.monotonic() + cfg.round_timeout
    # Named participants get until the timeout to connect; the run then goes on with
    # those present if they are enough (planning reports who is missing).
    wanted = max(cfg.min_nodes, len(cfg.participants))
    while len(node_ids := list(grid.get_node_ids())) < wanted:
        if time.monotonic() > deadline:
            if len(node_ids) >= cfg.min_nodes:
                break
            raise RunFailed(
                f"only {len(node_ids)} node(s) connected; the run needs {cfg.min_nodes}"
            )
        time.sleep(1)
    query = ConfigRecord({"labels": ",".join(cfg.labels)})
    messages = [
        Message(
            content=RecordDict({"config": query}), message_type=MessageType.QUERY, dst_node_id=n
        )
        for n in node_ids
    ]
    nodes, problems = [], []
    for reply in grid.send_and_receive(messages, timeout=cfg.round_timeout):
        node_id = reply.metadata.src_node_id
        if reply.has_error():
            problems.append(f"node {node_id} could not describe its data: {reply.error.reason}")
            continue
        info = reply.content.config_records.get("node")
        counts = reply.content.metric_records.get("counts")
        if info is None or counts is None:
            problems.append(f"node {node_id} sent an incomplete description")
            continue
        num_train, num_test = counts["num-train"], counts["num-test"]
        if not isinstance(num_train, int) or not isinstance(num_test, int):
            problems.append(f"node {node_id} sent non-integer example counts")
            continue
        nodes.append(NodeInfo(node_id, str(info["tenant"]), num_train, num_test))
    return nodes, problems


def _unique_known_tenants(
    session: Session, nodes: list[NodeInfo]
) -> tuple[list[tuple[NodeInfo, Tenant]], list[str]]:
    found, refused, seen = [], [], set()
    for node in sorted(nodes, key=lambda n: n.node_id):
        if node.tenant in seen:
            refused.append(
                f"node {node.node_id} also claims tenant {node.tenant!r}; one node per tenant"
            )
            continue
        try:
            tenant = get_tenant(session=session, name=node.tenant)
        except NotFound:
            refused.append(f"node {node.node_id} claims unknown tenant {node.tenant!r}")
            continue
        seen.add(node.tenant)
        found.append((node, tenant))
    return found, refused


def _participating(
    nodes: list[NodeInfo], participants: tuple[str, ...]
) -> tuple[list[NodeInfo], list[str]]:
    """The nodes of the run's participants (all nodes when it names none)."""
    if not participants:
        return nodes, []
    listed = ", ".join(participants)
    kept = [n for n in nodes if n.tenant in participants]
    refused = [
        f"node {n.node_id} serves tenant {n.tenant!r}, not a participant of this run ({listed})"
        for n in nodes
        if n.tenant not in participants
    ]
    present = {n.tenant for n in kept}
    refused += [
        f"participant {p!r} has no connected node" for p in participants if p not in present
    ]
    return kept, refused


def plan_run(
    session: Session, nodes: list[NodeInfo], cfg: ServerRunConfig
) -> tuple[dict[int, TenantPlan], list[str]]:
    """One plan per eligible node; every refusal comes with its reason."""
    plans: dict[int, TenantPlan] = {}
    nodes, outsiders = _participating(nodes, cfg.participants)
    found, refused = _unique_known_tenants(session, nodes)
    refused = outsiders + refused
    for node, tenant in found:
        try:
            plans[node.node_id] = plan_tenant(
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
            )
        except PlanRefused as exc:
            refused.append(str(exc))
            continue
        # A dataset with its own budget is checked for the whole run too, before round 1.
        p = plans[node.node_id]
        releases = [p.round_params] * cfg.rounds + (
            [p.personal_params] if p.personal_params else []
        )
        decision = check_release(session, tenant=tenant, dataset=cfg.dataset, new_events=releases)
        if not decision.allowed:
            del plans[node.node_id]
            refused.append(f"tenant {tenant.name!r} refused: {decision.reason}")
    return plans, refused


def _plans_to_json(plans: dict[int, TenantPlan]) -> str:
    out = {}
    for p in plans.values():
        out[p.tenant_name] = {
            "tenant_id": p.tenant_id,
            "num_train": p.num_train,
            "num_test": p.num_test,
            "round": dataclasses.asdict(p.round_params),
            "personal": dataclasses.asdict(p.personal_params) if p.personal_params else None,
            "run_epsilon": p.run_epsilon,
            "budget_reason": p.budget.reason,
        }
    return json.dumps(out, sort_keys=True)


def _plans_from_json(
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
        )
    return plans, refused


ParamsOf = Callable[[TenantPlan], DPParams | None]


def make_charge(
    platform: Platform,
    run_id: str,
    spec: ModelSpec,
    params_of: ParamsOf,
    dataset: str = DEFAULT_DATASET,
) -> Callable[[int, list[TenantPlan]], list[TenantPlan]]:
    """Write each tenant's charge before dispatch; refuse a tenant now over its budget
    (or over the budget of ``dataset``, when that dataset has one)."""

    def charge(server_round: int, plans: list[TenantPlan]) -> list[TenantPlan]:
        allowed = []
        with session_scope(platform.engine) as session:
            for plan in plans:
                params = params_of(plan)
                tenant = session.get(Tenant, plan.tenant_id)
                if params is None:
                    continue
                if tenant is None or tenant.deleted_at is not None:
                    log.error(
                        "round %d: tenant %s is gone; not dispatched",
                        server_round,
                        plan.tenant_name,
                    )
                    continue
                decision = check_release(
                    session, tenant=tenant, dataset=dataset, new_events=[params]
                )
                if not decision.allowed:
                    log.error(
                        "round %d: %s not dispatched: %s",
                        server_round,
                        plan.tenant_name,
                        decision.reason,
                    )
                    continue
                record_event(
                    session,
                    tenant_id=tenant.id,
                    run_id=run_id,
                    round=server_round,
                    params=params,
                    spec_sha256=spec.sha256(),
                    dataset=dataset,
                )
                allowed.append(plan)
        return allowed

    return charge


def make_sink(
    platform: Platform, run_id: str
) -> Callable[[int, str, TenantPlan, dict[str, float]], None]:
    def sink(server_round: int, phase: str, plan: TenantPlan, metrics: dict[str, float]) -> None:
        with session_scope(platform.engine) as session:
            session.add(
                RoundMetric(
                    run_id=run_id,
                    tenant_id=plan.tenant_id,
                    round=server_round,
                    phase=phase,
                    examples=int(metrics.get("num-examples", 0)),
                    loss=metrics.get("loss", float("nan")),
                    accuracy=metrics.get("accuracy", float("nan")),
                    macro_f1=metrics.get("macro-f1"),
                )
            )

    return sink


def _update_run(platform: Platform, run_id: str, **fields: Any) -> None:
    with session_scope(platform.engine) as session:
        run = session.get(TrainingRun, run_id) or TrainingRun(id=run_id)
        for key, value in fields.items():
            setattr(run, key, value)
        session.add(run)


def _fail_run(platform: Platform, run_id: str, error: str) -> None:
    """Record the failure, unless the run was cancelled (a stopped run fails by design);
    one conditional UPDATE, so a cancel committed meanwhile is not overwritten."""
    end_run(platform.engine, run_id, "failed", error, unless=("cancelled",))


def _stand_down_if_cancelled(platform: Platform, run_id: str, when: str) -> None:
    """Stop a run cancelled on the platform (the API's cancel also stops the Flower run;
    this covers a cancel that raced the submission)."""
    run = _get_run(platform, run_id)
    if run is not None and run.status == "cancelled":
        raise RunFailed(f"Run {run_id} was cancelled {when}.")


def _get_run(platform: Platform, run_id: str) -> TrainingRun | None:
    with Session(platform.engine, expire_on_commit=False) as session:
        return session.get(TrainingRun, run_id)


def run_federation(grid: Grid, cfg: ServerRunConfig, platform: Platform) -> RunOutcome:
    """The whole run; the TrainingRun row records status, plans, checkpoint and summary."""
    create_tables(platform.engine)
    create_ledger_tables(platform.engine)
    if cfg.resume:
        stored = _get_run(platform, cfg.run_id)
        if stored is None:
            raise RunFailed(f"No run {cfg.run_id} to resume.")
        if stored.status == "completed":
            raise RunFailed(f"Run {cfg.run_id} already completed; nothing to resume.")
        # The stored configuration wins: a resumed run is the same run.
        cfg = ServerRunConfig.from_mapping(_kebab(json.loads(stored.config_json)), {"resume": True})
    else:
        # Cancelled over HTTP while `flwr run` was submitting it: stand down.
        _stand_down_if_cancelled(platform, cfg.run_id, "before it started")
    _update_run(
        platform, cfg.run_id, status="running", error=None, config_json=json.dumps(cfg.public())
    )
    try:
        outcome = _run(grid, cfg, platform)
    except Exception as exc:
        _fail_run(platform, cfg.run_id, str(exc))
        raise
    # A completed run needs no checkpoint: its models are released.
    finished = _get_run(platform, cfg.run_id)
    if finished is not None and finished.checkpoint_blob:
        platform.store.delete(finished.checkpoint_blob)
    _update_run(
        platform,
        cfg.run_id,
        checkpoint_blob=None,
        status="completed",
        summary_json=json.dumps(outcome.summary),
        finished_at=utcnow(),
    )
    return outcome


def _kebab(public: dict[str, Any]) -> dict[str, Any]:
    return {
        k.replace("_", "-"): (",".join(v) if isinstance(v, list) else v) for k, v in public.items()
    }


def _run(grid: Grid, cfg: ServerRunConfig, platform: Platform) -> RunOutcome:
    nodes, problems = discover_nodes(grid, cfg)
    run = _get_run(platform, cfg.run_id)
    assert run is not None
    with session_scope(platform.engine) as session:
        if cfg.resume:
            plans, refused = _plans_from_json(run.plans_json, nodes, cfg.rounds)
        else:
            plans, refused = plan_run(session, nodes, cfg)
    refused = problems + refused
    for reason in refused:
        log.warning("refused: %s", reason)
    if len(plans) < cfg.min_nodes:
        raise RunFailed(
            f"{len(plans)} eligible tenant(s), the run needs {cfg.min_nodes}"
            + (": " + "; ".join(refused) if refused else "")
        )
    spec = cfg.spec()
    torch.manual_seed(cfg.seed)
    model = build_model(spec)
    start = 1
    if cfg.resume and run.checkpoint_round > 0:
        load_weights(model, load_checkpoint(platform, run))
        start = run.checkpoint_round + 1
        log.info("resuming run %s after round %d", cfg.run_id, run.checkpoint_round)
    if not cfg.resume:
        _update_run(platform, cfg.run_id, plans_json=_plans_to_json(plans))

    train_config: dict[str, Any] = {
        "spec": spec.to_json(),
        "local-epochs": cfg.local_epochs,
        "batch-size": cfg.batch_size,
        "learning-rate": cfg.learning_rate,
        "secure-mode": cfg.secure_mode,
        "seed": cfg.seed,
    }
    min_nodes = min(cfg.min_nodes, len(plans))
    strategy = create_strategy(
        cfg.strategy,
        min_nodes=min_nodes,
        proximal_mu=cfg.proximal_mu,
        server_learning_rate=cfg.server_learning_rate,
    )
    private = private_part(strategy)
    private.setup_private(
        plans=plans,
        train_config=train_config,
        charge=make_charge(platform, cfg.run_id, spec, lambda p: p.round_params, cfg.dataset),
        sink=make_sink(platform, cfg.run_id),
        fraction=cfg.fraction_train,
        min_nodes=min_nodes,
        seed=cfg.seed,
    )
    outer: Strategy = strategy
    if cfg.client_dp == "fixed":
        sampled = min(len(plans), max(min_nodes, round(cfg.fraction_train * len(plans))))
        outer = DifferentialPrivacyServerSideFixedClipping(
            strategy, cfg.client_dp_noise, cfg.client_dp_clip, sampled
        )

    arrays = ArrayRecord(model_state(model))
    for server_round in range(start, cfg.rounds + 1):
        _stand_down_if_cancelled(platform, cfg.run_id, f"before round {server_round}")
        arrays = _train_round(grid, cfg, platform, outer, private, server_round, arrays, model)

    load_model_state(model, _torch_state(arrays))
    outcome = RunOutcome(cfg.run_id, plans, refused)
    _stand_down_if_cancelled(platform, cfg.run_id, "before its models were released")
    personal = (
        _personalize(grid, cfg, platform, private, spec, arrays) if cfg.personalize_epochs else {}
    )
    outcome.summary = _release(platform, cfg, spec, save_weights(model), personal, outcome, private)
    return outcome


def _torch_state(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v) for k, v in arrays.to_torch_state_dict().items()}


def _train_round(
    grid: Grid,
    cfg: ServerRunConfig,
    platform: Platform,
    strategy: Strategy,
    private: PrivateMixin,
    server_round: int,
    arrays: ArrayRecord,
    model: torch.nn.Module,
) -> ArrayRecord:
    log.info("round %d/%d", server_round, cfg.rounds)
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
    if len(messages) < private.min_nodes:
        raise RunFailed(f"round {server_round}: only {len(messages)} tenant(s) could be dispatched")
    replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
    aggregated, _ = strategy.aggregate_train(server_round, replies)
    if private.last_accepted < private.min_nodes or aggregated is None:
        raise RunFailed(
            f"round {server_round}: {private.last_accepted} valid replies of {len(messages)} "
            f"({len(messages) - len(replies)} timed out), fewer than min-nodes "
            f"{private.min_nodes}; the dispatched round stays charged; "
            f"continue with `fedtext simulate --resume {cfg.run_id}` (simulation) or "
            f"`fedtext federation run --run-id {cfg.run_id} --config resume=true`"
        )
    evaluations = grid.send_and_receive(
        list(strategy.configure_evaluate(server_round, aggregated, ConfigRecord(), grid)),
        timeout=cfg.round_timeout,
    )
    strategy.aggregate_evaluate(server_round, evaluations)
    load_model_state(model, _torch_state(aggregated))
    with session_scope(platform.engine) as session:
        run = session.get(TrainingRun, cfg.run_id)
        assert run is not None
        save_checkpoint(platform, run, server_round, save_weights(model))
        session.add(run)
    return aggregated


@dataclass
class Personalized:
    weights: bytes
    metrics: dict[str, float]


def _personalize(
    grid: Grid,
    cfg: ServerRunConfig,
    platform: Platform,
    private: PrivateMixin,
    spec: ModelSpec,
    arrays: ArrayRecord,
) -> dict[str, Personalized]:
    """Each tenant fine-tunes the global model under DP, charged like any release."""
    phase_round = cfg.rounds + 1
    charge = make_charge(platform, cfg.run_id, spec, lambda p: p.personal_params, cfg.dataset)
    plans = charge(phase_round, private.live_plans(grid))
    messages = private._messages(
        MessageType.TRAIN,
        plans,
        arrays,
        lambda p: {
            **(p.personal_params.to_config() if p.personal_params else {}),
            "local-epochs": cfg.personalize_epochs,
            "phase": "personalize",
            "server-round": phase_round,
            "tenant": p.tenant_name,
        },
    )
    out: dict[str, Personalized] = {}
    for reply in grid.send_and_receive(messages, timeout=cfg.round_timeout):
        plan = private.plans.get(reply.metadata.src_node_id)
        if plan is None or plan.personal_params is None:
            continue
        if reply.has_error():
            private.failed.append(f"personalization {plan.tenant_name}: {reply.error.reason}")
            continue
        problem = check_train_reply(reply.content, plan, plan.personal_params)
        if problem:
            private.rejected.append(f"personalization {plan.tenant_name}: {problem}")
            continue
        metrics = {k: float(v) for k, v in reply.content.metric_records["metrics"].items()}  # type: ignore[arg-type]
        private.sink(phase_round, "personalize", plan, metrics)
        model = build_model(spec)
        load_model_state(model, _torch_state(reply.content["arrays"]))  # type: ignore[arg-type]
        out[plan.tenant_name] = Personalized(save_weights(model), metrics)
    return out


def _release(
    platform: Platform,
    cfg: ServerRunConfig,
    spec: ModelSpec,
    global_weights: bytes,
    personal: dict[str, Personalized],
    outcome: RunOutcome,
    private: PrivateMixin,
) -> dict[str, Any]:
    """Encrypt each tenant's final model (personalized if it has one) under its data key."""
    tenants: dict[str, Any] = {}
    with session_scope(platform.engine) as session:
        for plan in outcome.plans.values():
            tenant = session.get(Tenant, plan.tenant_id)
            if tenant is None or tenant.deleted_at is not None:
                continue
            last_eval = _last_metric(session, cfg.run_id, plan.tenant_id, "evaluate")
            charged = [
                e.params() for e in tenant_events(session, tenant.id) if e.run_id == cfg.run_id
            ]
            own = personal.get(tenant.name)
            metrics: dict[str, Any] = {
                "global_accuracy": last_eval.accuracy if last_eval else None,
                "global_macro_f1": last_eval.macro_f1 if last_eval else None,
                "personalized_accuracy": own.metrics.get("accuracy") if own else None,
                "personalized_macro_f1": own.metrics.get("macro-f1") if own else None,
                "test_examples": plan.num_test,
                "train_examples": plan.num_train,
            }
            metrics["accuracy"] = (
                metrics["personalized_accuracy"] if own else metrics["global_accuracy"]
            )
            metrics["macro_f1"] = (
                metrics["personalized_macro_f1"] if own else metrics["global_macro_f1"]
            )
            first = (
                deployed_version(session=session, tenant_id=tenant.id, name=cfg.model_name) is None
            )
            row = store_model_version(
                session=session,
                keyring=platform.keyring,
                store=platform.store,
                tenant=tenant,
                name=cfg.model_name,
                spec_json=spec.to_json(),
                weights=own.weights if own else global_weights,
                run_id=cfg.run_id,
                metrics={**metrics, "personalized": own is not None},
                deploy=first,  # the first version serves at once; later ones await an admin
            )
            tenants[tenant.name] = {
                **metrics,
                "personalized": own is not None,
                "releases_charged": len(charged),
                "run_epsilon": compose_epsilon(charged, plan.round_params.delta),
                "noise_multiplier": plan.round_params.noise_multiplier,
                "sample_rate": plan.round_params.sample_rate,
                "steps_per_round": plan.round_params.steps,
                "delta": plan.round_params.delta,
                "model": cfg.model_name,
                "version": row.version,
                "deployed": row.deployed,
            }
    summary: dict[str, Any] = {
        "tenants": tenants,
        "refused": outcome.refused,
        "rejected": private.rejected,
        "failed": private.failed,
        "strategy": cfg.strategy,
    }
    if cfg.client_dp == "fixed":
        # Client-level DP (unit: one tenant's whole update): a Gaussian mechanism per round
        # without sampling amplification, composed over the rounds.
        delta = min(p.round_params.delta for p in outcome.plans.values())
        summary["client_level_dp"] = {
            "noise_multiplier": cfg.client_dp_noise,
            "clip_norm": cfg.client_dp_clip,
            "delta": delta,
            "epsilon": compose_epsilon([(cfg.client_dp_noise, 1.0, cfg.rounds)], delta),
        }
    return summary


def _last_metric(session: Session, run_id: str, tenant_id: str, phase: str) -> RoundMetric | None:
    return session.exec(
        select(RoundMetric)
        .where(
            RoundMetric.run_id == run_id,
            RoundMetric.tenant_id == tenant_id,
            RoundMetric.phase == phase,
        )
        .order_by(col(RoundMetric.round).desc())
    ).first()


def build_server_app(
    platform_factory: Callable[[], Platform], overrides: Mapping[str, Any] | None = None
) -> ServerApp:
    """A ServerApp reading ``context.run_config`` (pyproject) with ``overrides`` on top."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = ServerRunConfig.from_mapping(dict(context.run_config), dict(overrides or {}))
        run_federation(grid, cfg, platform_factory())

    return app
