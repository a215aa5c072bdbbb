"""The round loop: the model a run starts from, the strategy stack, one checkpoint per round.

The loop is ours (so it can checkpoint after every round and resume a killed run);
selection of tenants, charging and reply checks are ``PrivateStrategy``'s, aggregation
and the optional client-level DP wrapper are Flower's.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, Strategy

from models import ModelSpec, build_model, load_model_state, load_weights, model_state, save_weights
from models.encoder_head import FAMILY as ENCODER_HEAD
from runs.lifecycle import is_cancelled
from runs.spec import RunSpec
from server.charging import make_charge
from server.checkpoint import final_global_weights, load_checkpoint, save_checkpoint
from server.errors import RunFailed
from server.planning import TenantPlan
from server.strategy import MetricsSink, PrivateStrategy, create_strategy
from tenancy.db import session_scope
from tenancy.platform import Platform
from tenancy.tables import RoundMetric, TrainingRun

log = logging.getLogger("fedtext.server")


def make_sink(platform: Platform, run_id: str) -> MetricsSink:
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


def start_from_head(platform: Platform, cfg: RunSpec, model: torch.nn.Module) -> None:
    """LP-FT: copy a completed encoder-head run's final global DP head into ``model``'s
    head. Post-processing of a released model: it costs no privacy."""
    from safetensors.torch import load as st_load

    stored, weights = final_global_weights(platform, cfg.init_head_run)
    source = RunSpec.parse(stored).spec()
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


def torch_state(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v) for k, v in arrays.to_torch_state_dict().items()}


def initial_model(
    platform: Platform, cfg: RunSpec, spec: ModelSpec, run: TrainingRun
) -> tuple[torch.nn.Module, int]:
    """The model round ``start`` begins from: fresh, from an LP-FT head, or a resumed
    run's last checkpoint; and that first round."""
    torch.manual_seed(cfg.seed)
    model = build_model(spec)
    if cfg.init_head_run and not cfg.resume:
        start_from_head(platform, cfg, model)
    if cfg.resume and run.checkpoint_round > 0:
        load_weights(model, load_checkpoint(platform, run))
        log.info("resuming run %s after round %d", cfg.run_id, run.checkpoint_round)
        return model, run.checkpoint_round + 1
    return model, 1


def build_strategy(
    platform: Platform, cfg: RunSpec, spec: ModelSpec, plans: dict[int, TenantPlan]
) -> tuple[Strategy, PrivateStrategy]:
    """The strategy the rounds call (client-level DP outermost, when asked for) and the
    private wrapper inside it, whose round logs the loop reads."""
    min_nodes = min(cfg.min_nodes, len(plans))
    private = PrivateStrategy(
        create_strategy(
            cfg.strategy,
            proximal_mu=cfg.proximal_mu,
            server_learning_rate=cfg.server_learning_rate,
        ),
        plans=plans,
        charge=make_charge(platform, cfg.run_id, spec, lambda p: p.round_params),
        sink=make_sink(platform, cfg.run_id),
        train_config={
            "spec": spec.to_json(),
            "local-epochs": cfg.local_epochs,
            "batch-size": cfg.batch_size,
            "learning-rate": cfg.learning_rate,
            "secure-mode": cfg.secure_mode,
            "seed": cfg.seed,
        },
        fraction=cfg.fraction_train,
        min_nodes=min_nodes,
        seed=cfg.seed,
    )
    if cfg.client_dp != "fixed":
        return private, private
    # Client-level DP clips each tenant's whole update before the private checks and
    # aggregation see it, and noises the aggregate.
    sampled = min(len(plans), max(min_nodes, round(cfg.fraction_train * len(plans))))
    dp = DifferentialPrivacyServerSideFixedClipping(
        private, cfg.client_dp_noise, cfg.client_dp_clip, sampled
    )
    return dp, private


def stand_down_if_cancelled(platform: Platform, run_id: str, when: str) -> None:
    """Stop a run cancelled on the platform (the API's cancel also stops the Flower run;
    this covers a cancel that raced the submission)."""
    if is_cancelled(platform.engine, run_id):
        raise RunFailed(f"Run {run_id} was cancelled {when}.")


def train_round(
    grid: Grid,
    cfg: RunSpec,
    platform: Platform,
    strategy: Strategy,
    private: PrivateStrategy,
    server_round: int,
    arrays: ArrayRecord,
    model: torch.nn.Module,
) -> ArrayRecord:
    """One charged, checked, aggregated round, checkpointed before the next begins."""
    log.info("round %d/%d", server_round, cfg.rounds)
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
    if len(messages) < private.min_nodes:
        raise RunFailed(f"round {server_round}: only {len(messages)} tenant(s) could be dispatched")
    replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
    aggregated, _ = strategy.aggregate_train(server_round, replies)
    accepted = len(private.round_log(server_round).accepted)
    if accepted < private.min_nodes or aggregated is None:
        raise RunFailed(
            f"round {server_round}: {accepted} valid replies of {len(messages)} "
            f"({len(messages) - len(replies)} timed out), fewer than min-nodes "
            f"{private.min_nodes}; the dispatched round stays charged; "
            f"continue with `fedtext simulate --resume {cfg.run_id}` (simulation) or "
            f"`fedtext federation run --run-id {cfg.run_id} --config resume=true`"
        )
    # No per-round federated evaluation: each one would be a release to charge. The
    # global model is evaluated once, after the last round (release.final_phase).
    load_model_state(model, torch_state(aggregated))
    with session_scope(platform.engine) as session:
        run = session.get(TrainingRun, cfg.run_id)
        assert run is not None
        save_checkpoint(platform, run, server_round, save_weights(model))
        session.add(run)
    return aggregated


def train_rounds(
    grid: Grid,
    cfg: RunSpec,
    platform: Platform,
    strategy: Strategy,
    private: PrivateStrategy,
    model: torch.nn.Module,
    start: int,
) -> ArrayRecord:
    """Rounds ``start`` to ``cfg.rounds``; ``model`` ends holding the global model."""
    arrays = ArrayRecord(model_state(model))
    for server_round in range(start, cfg.rounds + 1):
        stand_down_if_cancelled(platform, cfg.run_id, f"before round {server_round}")
        arrays = train_round(grid, cfg, platform, strategy, private, server_round, arrays, model)
    load_model_state(model, torch_state(arrays))
    return arrays
