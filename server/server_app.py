"""The ServerApp: discover tenants, plan DP, charge rounds, aggregate, release encrypted models."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from sqlmodel import Session, col, select

from models import ModelSpec, build_model, load_model_state, model_state, save_weights
from privacy.budget import check_budget
from privacy.ledger import create_tables as create_ledger_tables
from privacy.ledger import record_event, tenant_events
from server.config import ServerRunConfig
from server.planning import PlanRefused, TenantPlan, plan_tenant, run_epsilon
from server.strategy import PrivateFedAvg
from tenancy.db import create_tables, session_scope
from tenancy.errors import NotFound
from tenancy.platform import Platform
from tenancy.registry import deployed_version, store_model_version
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
    rejected: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def discover_nodes(grid: Grid, cfg: ServerRunConfig) -> tuple[list[NodeInfo], list[str]]:
    """Ask every connected node which tenant it serves and how much data it holds."""
    deadline = time.monotonic() + cfg.round_timeout
    while len(node_ids := list(grid.get_node_ids())) < cfg.min_nodes:
        if time.monotonic() > deadline:
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


def plan_run(
    session: Session, nodes: list[NodeInfo], cfg: ServerRunConfig
) -> tuple[dict[int, TenantPlan], list[str]]:
    """One plan per eligible node; every refusal comes with its reason."""
    plans: dict[int, TenantPlan] = {}
    refused: list[str] = []
    seen: dict[str, int] = {}
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
            )
        except PlanRefused as exc:
            refused.append(str(exc))
            continue
        seen[node.tenant] = node.node_id
        plans[node.node_id] = plan
    return plans, refused


def make_charge(
    platform: Platform, run_id: str, spec: ModelSpec
) -> Callable[[int, list[TenantPlan]], list[TenantPlan]]:
    """Write each tenant's round charge before dispatch; refuse a tenant now over budget."""

    def charge(server_round: int, plans: list[TenantPlan]) -> list[TenantPlan]:
        allowed = []
        with session_scope(platform.engine) as session:
            for plan in plans:
                tenant = session.get(Tenant, plan.tenant_id)
                if tenant is None or tenant.deleted_at is not None:
                    log.error(
                        "round %d: tenant %s is gone; not dispatched",
                        server_round,
                        plan.tenant_name,
                    )
                    continue
                past = [e.params() for e in tenant_events(session, tenant.id)]
                decision = check_budget(
                    past,
                    [plan.round_params],
                    budget_epsilon=tenant.budget_epsilon,
                    delta=plan.round_params.delta,
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
                    params=plan.round_params,
                    spec_sha256=spec.sha256(),
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


def _set_run(platform: Platform, run_id: str, **fields: Any) -> None:
    with session_scope(platform.engine) as session:
        run = session.get(TrainingRun, run_id) or TrainingRun(id=run_id)
        for key, value in fields.items():
            setattr(run, key, value)
        session.add(run)


def run_federation(grid: Grid, cfg: ServerRunConfig, platform: Platform) -> RunOutcome:
    """The whole run; the TrainingRun row records its status and summary."""
    create_tables(platform.engine)
    create_ledger_tables(platform.engine)
    _set_run(platform, cfg.run_id, status="running", config_json=json.dumps(cfg.public()))
    try:
        outcome = _run(grid, cfg, platform)
    except Exception as exc:
        _set_run(platform, cfg.run_id, status="failed", error=str(exc), finished_at=utcnow())
        raise
    _set_run(
        platform,
        cfg.run_id,
        status="completed",
        summary_json=json.dumps(outcome.summary),
        finished_at=utcnow(),
    )
    return outcome


def _run(grid: Grid, cfg: ServerRunConfig, platform: Platform) -> RunOutcome:
    nodes, problems = discover_nodes(grid, cfg)
    with session_scope(platform.engine) as session:
        plans, refused = plan_run(session, nodes, cfg)
    refused = problems + refused
    for reason in refused:
        log.warning("refused: %s", reason)
    if len(plans) < cfg.min_nodes:
        raise RunFailed(
            f"{len(plans)} eligible tenant(s), the run needs {cfg.min_nodes}"
            + (": " + "; ".join(refused) if refused else "")
        )
    spec = ModelSpec.create(cfg.model, list(cfg.labels), max_seq_len=cfg.max_seq_len)
    model = build_model(spec)
    train_config: dict[str, Any] = {
        "spec": spec.to_json(),
        "local-epochs": cfg.local_epochs,
        "batch-size": cfg.batch_size,
        "learning-rate": cfg.learning_rate,
        "secure-mode": cfg.secure_mode,
    }
    strategy = PrivateFedAvg(
        plans=plans,
        train_config=train_config,
        charge=make_charge(platform, cfg.run_id, spec),
        sink=make_sink(platform, cfg.run_id),
        min_nodes=min(cfg.min_nodes, len(plans)),
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model_state(model)),
        num_rounds=cfg.rounds,
        timeout=cfg.round_timeout,
    )
    load_model_state(
        model, {k: torch.as_tensor(v) for k, v in result.arrays.to_torch_state_dict().items()}
    )
    outcome = RunOutcome(cfg.run_id, plans, refused, strategy.rejected)
    outcome.summary = _release(platform, cfg, spec, save_weights(model), outcome)
    return outcome


def _release(
    platform: Platform, cfg: ServerRunConfig, spec: ModelSpec, weights: bytes, outcome: RunOutcome
) -> dict[str, Any]:
    """Encrypt the final model under each tenant's data key and record the run summary."""
    tenants: dict[str, Any] = {}
    with session_scope(platform.engine) as session:
        for plan in outcome.plans.values():
            tenant = session.get(Tenant, plan.tenant_id)
            if tenant is None or tenant.deleted_at is not None:
                continue
            last_eval = _last_metric(session, cfg.run_id, plan.tenant_id, "evaluate")
            rounds_charged = sum(
                1 for e in tenant_events(session, tenant.id) if e.run_id == cfg.run_id
            )
            metrics = {
                "accuracy": last_eval.accuracy if last_eval else None,
                "macro_f1": last_eval.macro_f1 if last_eval else None,
                "test_examples": plan.num_test,
                "train_examples": plan.num_train,
            }
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
                weights=weights,
                run_id=cfg.run_id,
                metrics=metrics,
                deploy=first,  # the first version serves at once; later ones await an admin
            )
            tenants[tenant.name] = {
                **metrics,
                "rounds_charged": rounds_charged,
                "run_epsilon": run_epsilon(plan, rounds_charged),
                "noise_multiplier": plan.round_params.noise_multiplier,
                "sample_rate": plan.round_params.sample_rate,
                "steps_per_round": plan.round_params.steps,
                "delta": plan.round_params.delta,
                "model": cfg.model_name,
                "version": row.version,
                "deployed": row.deployed,
            }
    return {"tenants": tenants, "refused": outcome.refused, "rejected": outcome.rejected}


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
