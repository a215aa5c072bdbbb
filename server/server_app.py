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
from sqlmodel import Session, select

from models import ModelSpec, build_model, load_model_state, load_weights, model_state, save_weights
from models.encoder_head import FAMILY as ENCODER_HEAD
from privacy.accounting import compose_epsilon
from privacy.budget import check_budget, check_release
from privacy.heads import platform_signer, sign_and_store
from privacy.ledger import DEFAULT_DATASET, PrivacyEvent, lock_tenant, record_event, tenant_events
from privacy.ledger import create_tables as create_ledger_tables
from privacy.params import DPParams
from privacy.reservations import outstanding, reserve, uncharged
from runs.lifecycle import (
    active_run_ids,
    complete_run,
    fail_run,
    get_run,
    is_cancelled,
    start_run,
    update_run,
)
from runs.status import RunStatus
from server.checkpoint import final_global_weights, load_checkpoint, save_checkpoint
from server.config import ServerRunConfig
from server.planning import PlanRefused, TenantPlan, plan_tenant
from server.strategy import (
    EVAL_PREFIX,
    PrivateMixin,
    check_train_reply,
    create_strategy,
    private_part,
    read_evaluation,
    reply_failure,
)
from tenancy.db import create_tables, session_scope
from tenancy.errors import NotFound
from tenancy.platform import Platform
from tenancy.registry import deployed_version, store_model_version
from tenancy.tables import RoundMetric, Tenant, TrainingRun
from tenancy.tenants import get_tenant

log = logging.getLogger("fedtext.server")


class RunFailed(RuntimeError):
    """The run cannot proceed; the message is for the operator."""


@dataclass
class NodeInfo:
    node_id: int
    tenant: str
    num_train: int  # stated by the node: planning needs it (docs/AUDIT.md)
    num_test: int = 0  # not reported: the held-out split's size stays on the node


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
            problems.append(f"node {node_id} could not describe its data: {reply_failure(reply)}")
            continue
        info = reply.content.config_records.get("node")
        counts = reply.content.metric_records.get("counts")
        if info is None or counts is None or "num-train" not in counts:
            problems.append(f"node {node_id} sent an incomplete description")
            continue
        num_train = counts["num-train"]
        if not isinstance(num_train, int):
            problems.append(f"node {node_id} sent a non-integer example count")
            continue
        nodes.append(NodeInfo(node_id, str(info["tenant"]), num_train))
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
    platform: Platform, nodes: list[NodeInfo], cfg: ServerRunConfig
) -> tuple[dict[int, TenantPlan], list[str]]:
    """One plan per eligible node, each reserved against its tenant's budget; every
    refusal comes with its reason.

    Each tenant is planned inside ``lock_tenant``: the budget check counts other runs'
    reservations, and this run's exact releases replace its submission estimate in the
    same transaction, so no concurrent run can take the budget between check and hold.
    """
    plans: dict[int, TenantPlan] = {}
    with Session(platform.engine) as session:
        nodes, outsiders = _participating(nodes, cfg.participants)
        found, refused = _unique_known_tenants(session, nodes)
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


def _reserve_resumed(
    platform: Platform, cfg: ServerRunConfig, plans: dict[int, TenantPlan]
) -> list[str]:
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


def _plans_to_json(plans: dict[int, TenantPlan]) -> str:
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
) -> Callable[[int, list[TenantPlan]], list[TenantPlan]]:
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


def make_sink(
    platform: Platform, run_id: str
) -> Callable[[int, str, TenantPlan, dict[str, float]], None]:
    """Round rows for progress: "train" rows say a tenant's update was accepted (no
    metric leaves a node); "evaluate"/"personalize" rows hold the DP-released figures."""

    def sink(server_round: int, phase: str, plan: TenantPlan, metrics: dict[str, float]) -> None:
        examples = metrics.get("examples", plan.num_train if phase == "train" else 0)
        with session_scope(platform.engine) as session:
            session.add(
                RoundMetric(
                    run_id=run_id,
                    tenant_id=plan.tenant_id,
                    round=server_round,
                    phase=phase,
                    examples=max(0, round(examples)),
                    loss=None,
                    accuracy=metrics.get("accuracy"),
                    macro_f1=metrics.get("macro_f1"),
                )
            )

    return sink


def _stand_down_if_cancelled(platform: Platform, run_id: str, when: str) -> None:
    """Stop a run cancelled on the platform (the API's cancel also stops the Flower run;
    this covers a cancel that raced the submission)."""
    if is_cancelled(platform.engine, run_id):
        raise RunFailed(f"Run {run_id} was cancelled {when}.")


def run_federation(grid: Grid, cfg: ServerRunConfig, platform: Platform) -> RunOutcome:
    """The whole run; the TrainingRun row records status, plans, checkpoint and summary."""
    create_tables(platform.engine)
    create_ledger_tables(platform.engine)
    if cfg.resume:
        stored = get_run(platform.engine, cfg.run_id)
        if stored is None:
            raise RunFailed(f"No run {cfg.run_id} to resume.")
        if stored.status == RunStatus.COMPLETED:
            raise RunFailed(f"Run {cfg.run_id} already completed; nothing to resume.")
        # The stored configuration wins: a resumed run is the same run.
        cfg = ServerRunConfig.from_mapping(_kebab(json.loads(stored.config_json)), {"resume": True})
    # A new run cancelled over HTTP while `flwr run` was submitting it stands down.
    if not start_run(
        platform.engine, cfg.run_id, config_json=json.dumps(cfg.public()), resume=cfg.resume
    ):
        raise RunFailed(f"Run {cfg.run_id} was cancelled before it started.")
    try:
        outcome = _run(grid, cfg, platform)
    except Exception as exc:
        fail_run(platform.engine, cfg.run_id, str(exc))
        _sign_heads(platform, _participant_ids(platform, cfg.run_id))
        raise
    # A completed run needs no checkpoint: its models are released. An encoder-head run
    # asked to (keep-head) keeps its final global head (DP output, encrypted): a later
    # minilm run may start from it (init-head-run, LP-FT).
    finished = get_run(platform.engine, cfg.run_id)
    keep = cfg.model == ENCODER_HEAD and cfg.keep_head
    if finished is not None and finished.checkpoint_blob and not keep:
        platform.store.delete(finished.checkpoint_blob)
    complete_run(
        platform.engine,
        cfg.run_id,
        summary_json=json.dumps(outcome.summary),
        **({} if keep else {"checkpoint_blob": None}),
    )
    _sign_heads(platform, [p.tenant_id for p in outcome.plans.values()])
    return outcome


def _participant_ids(platform: Platform, run_id: str) -> list[str]:
    with Session(platform.engine) as session:
        return sorted(
            {
                e.tenant_id
                for e in session.exec(select(PrivacyEvent).where(PrivacyEvent.run_id == run_id))
            }
        )


def _sign_heads(platform: Platform, tenant_ids: list[str]) -> None:
    """Keep a signed head of every tenant the run charged, as the run ends."""
    try:
        signer = platform_signer(platform.keyring)
        with session_scope(platform.engine) as session:
            for tenant_id in tenant_ids:
                tenant = session.get(Tenant, tenant_id)
                if tenant is not None:
                    sign_and_store(
                        session,
                        signer,
                        tenant_id=tenant.id,
                        budget_epsilon=tenant.budget_epsilon,
                        budget_delta=tenant.budget_delta,
                    )
    except Exception:  # a missing key must not turn a finished run into a failed one
        log.exception("could not sign the ledger heads of the run's tenants")


def _kebab(public: dict[str, Any]) -> dict[str, Any]:
    return {
        k.replace("_", "-"): (",".join(v) if isinstance(v, list) else v) for k, v in public.items()
    }


def _run(grid: Grid, cfg: ServerRunConfig, platform: Platform) -> RunOutcome:
    nodes, problems = discover_nodes(grid, cfg)
    run = get_run(platform.engine, cfg.run_id)
    assert run is not None
    if cfg.resume:
        plans, refused = _plans_from_json(run.plans_json, nodes, cfg.rounds)
        refused += _reserve_resumed(platform, cfg, plans)
    else:
        plans, refused = plan_run(platform, nodes, cfg)
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
    if cfg.init_head_run and not cfg.resume:
        _start_from_head(platform, cfg, model)
    start = 1
    if cfg.resume and run.checkpoint_round > 0:
        load_weights(model, load_checkpoint(platform, run))
        start = run.checkpoint_round + 1
        log.info("resuming run %s after round %d", cfg.run_id, run.checkpoint_round)
    if not cfg.resume:
        update_run(platform.engine, cfg.run_id, plans_json=_plans_to_json(plans))

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
    personal, released = _final_phase(grid, cfg, platform, private, spec, arrays)
    outcome.summary = _release(
        platform, cfg, spec, save_weights(model), personal, released, outcome, private
    )
    return outcome


def _start_from_head(platform: Platform, cfg: ServerRunConfig, model: torch.nn.Module) -> None:
    """LP-FT: copy a completed encoder-head run's final global DP head into ``model``'s
    head. Post-processing of a released model: it costs no privacy."""
    from safetensors.torch import load as st_load

    stored, weights = final_global_weights(platform, cfg.init_head_run)
    source = ServerRunConfig.from_mapping(_kebab(stored), {"resume": False}).spec()
    head = source.family_config()
    if source.family != ENCODER_HEAD or head.hidden_dim:
        raise RunFailed(f"init-head-run {cfg.init_head_run}: not a linear encoder-head run.")
    state = st_load(weights)
    # The head's one Linear layer (after an optional Dropout, so not always "head.0").
    (weight_key,) = (k for k in state if k.endswith(".weight"))
    bias_key = weight_key.removesuffix("weight") + "bias"
    minilm = ModelSpec.create(ENCODER_HEAD, list(cfg.labels)).family_config()
    if head.encoder_sha256 != minilm.encoder_sha256:
        raise RunFailed(
            f"init-head-run {cfg.init_head_run}: its head was trained on encoder "
            f"{head.encoder!r}, not on the MiniLM-L6 this minilm model fine-tunes."
        )
    if source.labels != tuple(cfg.labels):
        raise RunFailed(
            f"init-head-run {cfg.init_head_run}: labels {list(source.labels)} differ from "
            f"this run's {list(cfg.labels)}."
        )
    with torch.no_grad():
        model.head.weight.copy_(state[weight_key])  # type: ignore[union-attr,operator]
        model.head.bias.copy_(state[bias_key])  # type: ignore[union-attr,operator]
    log.info("run %s starts from the head of run %s", cfg.run_id, cfg.init_head_run)


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
    # No per-round federated evaluation: each one would be a release to charge. The
    # global model is evaluated once, after the last round (``_final_phase``).
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


# A tenant's released evaluation: model ("global", "personal") -> DP-released figures
Released = dict[str, dict[str, float]]


def _final_phase(
    grid: Grid,
    cfg: ServerRunConfig,
    platform: Platform,
    private: PrivateMixin,
    spec: ModelSpec,
    arrays: ArrayRecord,
) -> tuple[dict[str, Personalized], dict[str, Released]]:
    """Personalization and the released evaluation, charged together at round R + 1.

    With personalization each tenant fine-tunes the global model under DP and, in the same
    reply, releases noised confusion counts of the global and the personalized model on
    its held-out split. Without it, the global model is evaluated once and released the
    same way. Both releases are charged before dispatch like any other.
    """
    phase_round = cfg.rounds + 1

    def releases(p: TenantPlan) -> list[tuple[str, DPParams]]:
        out: list[tuple[str, DPParams]] = []
        if cfg.personalize_epochs and p.personal_params:
            out.append(("train", p.personal_params))
        if p.eval_params:
            out.append(("evaluate", p.eval_params))
        return out

    charge = make_charge(platform, cfg.run_id, spec, releases, cfg.dataset)
    plans = charge(phase_round, private.live_plans(grid))
    personal: dict[str, Personalized] = {}
    released: dict[str, Released] = {}
    if not cfg.personalize_epochs:
        messages = private.evaluate_messages(phase_round, arrays, plans)
        for reply in grid.send_and_receive(messages, timeout=cfg.round_timeout):
            plan = private.plans.get(reply.metadata.src_node_id)
            if plan is None:
                continue
            if reply.has_error():
                private.failed.append(f"evaluation {plan.tenant_name}: {reply_failure(reply)}")
                continue
            got = read_evaluation(reply.content, plan, ("global",))
            if isinstance(got, str):
                private.rejected.append(f"evaluation {plan.tenant_name}: {got}")
                continue
            private.sink(cfg.rounds, "evaluate", plan, got["global"])
            released[plan.tenant_name] = got
        return personal, released
    messages = private._messages(
        MessageType.TRAIN,
        plans,
        arrays,
        lambda p: {
            **(p.personal_params.to_config() if p.personal_params else {}),
            **(p.eval_params.to_config(prefix=EVAL_PREFIX) if p.eval_params else {}),
            "local-epochs": cfg.personalize_epochs,
            "phase": "personalize",
            "server-round": phase_round,
            "tenant": p.tenant_name,
        },
    )
    for reply in grid.send_and_receive(messages, timeout=cfg.round_timeout):
        plan = private.plans.get(reply.metadata.src_node_id)
        if plan is None or plan.personal_params is None:
            continue
        if reply.has_error():
            private.failed.append(f"personalization {plan.tenant_name}: {reply_failure(reply)}")
            continue
        problem = check_train_reply(reply.content, plan, plan.personal_params)
        if problem:
            private.rejected.append(f"personalization {plan.tenant_name}: {problem}")
            continue
        if plan.eval_params is not None:
            got = read_evaluation(reply.content, plan, ("global", "personal"))
            if isinstance(got, str):
                private.rejected.append(f"evaluation {plan.tenant_name}: {got}")
            else:
                private.sink(cfg.rounds, "evaluate", plan, got["global"])
                private.sink(phase_round, "personalize", plan, got["personal"])
                released[plan.tenant_name] = got
        model = build_model(spec)
        load_model_state(model, _torch_state(reply.content["arrays"]))  # type: ignore[arg-type]
        personal[plan.tenant_name] = Personalized(save_weights(model))
    return personal, released


def _release(
    platform: Platform,
    cfg: ServerRunConfig,
    spec: ModelSpec,
    global_weights: bytes,
    personal: dict[str, Personalized],
    released: dict[str, Released],
    outcome: RunOutcome,
    private: PrivateMixin,
) -> dict[str, Any]:
    """Encrypt each tenant's final model (personalized if it has one) under its data key.

    The metrics in the summary and on the model version are the DP-released ones
    (noised confusion counts, charged to the ledger); ``None`` where nothing was
    released. Exact metrics never reach the coordinator.
    """
    tenants: dict[str, Any] = {}
    with session_scope(platform.engine) as session:
        for plan in outcome.plans.values():
            tenant = session.get(Tenant, plan.tenant_id)
            if tenant is None or tenant.deleted_at is not None:
                continue
            charged = [
                e.params() for e in tenant_events(session, tenant.id) if e.run_id == cfg.run_id
            ]
            own = personal.get(tenant.name)
            got = released.get(tenant.name, {})
            glob, pers = got.get("global"), got.get("personal")
            metrics: dict[str, Any] = {
                "global_accuracy": glob["accuracy"] if glob else None,
                "global_macro_f1": glob["macro_f1"] if glob else None,
                "personalized_accuracy": pers["accuracy"] if pers else None,
                "personalized_macro_f1": pers["macro_f1"] if pers else None,
                # The released (noised) total of the held-out split, not an exact count.
                "test_examples": round(glob["examples"]) if glob else None,
                "train_examples": plan.num_train,
                "metrics_release": _metrics_release(plan),
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
        "metrics_release": (
            f"evaluation metrics are DP-released: Gaussian noise of standard deviation "
            f"{cfg.eval_noise:g} on every confusion count, charged to the ledger as purpose "
            "'evaluate'; no training metric leaves a node"
            if cfg.eval_noise
            else "no evaluation metric is released (eval-noise 0); no training metric leaves a node"
        ),
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


def _metrics_release(plan: TenantPlan) -> dict[str, Any] | None:
    """How this tenant's metrics were released: the Gaussian release's parameters."""
    if plan.eval_params is None:
        return None
    return {
        "mechanism": "gaussian on confusion counts (sensitivity 1)",
        "noise_sd": plan.eval_params.noise_multiplier,
        "matrices": plan.eval_params.steps,
        "delta": plan.eval_params.delta,
    }


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
