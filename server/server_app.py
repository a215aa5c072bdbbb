"""The ServerApp: discover tenants, plan DP, train the rounds, personalize, release.

Each step lives in a module of its own (``discovery``, ``charging``, ``rounds``,
``release``); this one orders them and keeps the run's status on its row through
``runs.lifecycle``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from models import save_weights
from models.encoder_head import FAMILY as ENCODER_HEAD
from privacy.db import create_tables as create_ledger_tables
from runs.lifecycle import complete_run, fail_run, get_run, start_run, update_run
from runs.spec import RunSpec
from runs.status import RunStatus
from server.charging import plan_run, plans_from_json, plans_to_json, reserve_resumed
from server.discovery import discover_nodes
from server.errors import RunFailed
from server.planning import TenantPlan
from server.release import final_phase, participant_ids, release_models, sign_heads
from server.rounds import (
    build_strategy,
    initial_model,
    stand_down_if_cancelled,
    train_rounds,
)
from tenancy.db import create_tables
from tenancy.platform import Platform

log = logging.getLogger("fedtext.server")


@dataclass
class RunOutcome:
    run_id: str
    plans: dict[int, TenantPlan]
    refused: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def run_federation(
    grid: Grid, cfg: RunSpec, platform: Platform, *, simulated: bool = False
) -> RunOutcome:
    """The whole run; the TrainingRun row records status, plans, checkpoint and summary.

    ``simulated``: the nodes are the platform's own virtual ones (Simulation Engine), so
    each tenant's charges land on the dataset its admin's policy names; on a federation
    each node declares its own."""
    create_tables(platform.engine)
    create_ledger_tables(platform.engine)
    if cfg.resume:
        stored = get_run(platform.engine, cfg.run_id)
        if stored is None:
            raise RunFailed(f"No run {cfg.run_id} to resume.")
        if stored.status == RunStatus.COMPLETED:
            raise RunFailed(f"Run {cfg.run_id} already completed; nothing to resume.")
        # The stored configuration wins: a resumed run is the same run.
        # A run stored before runs stopped naming a dataset keeps charging the plan's.
        stored_cfg = {k: v for k, v in json.loads(stored.config_json).items() if k != "dataset"}
        cfg = RunSpec.parse({**stored_cfg, "resume": True})
    # A new run cancelled over HTTP while `flwr run` was submitting it stands down.
    if not start_run(
        platform.engine, cfg.run_id, config_json=json.dumps(cfg.public()), resume=cfg.resume
    ):
        raise RunFailed(f"Run {cfg.run_id} was cancelled before it started.")
    try:
        outcome = _run(grid, cfg, platform, simulated=simulated)
    except Exception as exc:
        fail_run(platform.engine, cfg.run_id, str(exc))
        sign_heads(platform, participant_ids(platform, cfg.run_id))
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
    sign_heads(platform, [p.tenant_id for p in outcome.plans.values()])
    return outcome


def _run(grid: Grid, cfg: RunSpec, platform: Platform, *, simulated: bool) -> RunOutcome:
    nodes, problems = discover_nodes(grid, cfg, platform.engine)
    run = get_run(platform.engine, cfg.run_id)
    assert run is not None
    if cfg.resume:
        plans, refused = plans_from_json(run.plans_json, nodes, cfg.rounds)
        refused += reserve_resumed(platform, cfg, plans)
    else:
        plans, refused = plan_run(platform, nodes, cfg, simulated=simulated)
    refused = problems + refused
    for reason in refused:
        log.warning("refused: %s", reason)
    if len(plans) < cfg.min_nodes:
        raise RunFailed(
            f"{len(plans)} eligible tenant(s), the run needs {cfg.min_nodes}"
            + (": " + "; ".join(refused) if refused else "")
        )
    spec = cfg.spec()
    model, start = initial_model(platform, cfg, spec, run)
    if not cfg.resume:
        update_run(platform.engine, cfg.run_id, plans_json=plans_to_json(plans))
    strategy, private = build_strategy(platform, cfg, spec, plans)
    arrays = train_rounds(grid, cfg, platform, strategy, private, model, start)

    outcome = RunOutcome(cfg.run_id, plans, refused)
    stand_down_if_cancelled(platform, cfg.run_id, "before its models were released")
    personal, released = final_phase(grid, cfg, platform, private, spec, arrays)
    outcome.summary = release_models(
        platform,
        cfg,
        spec,
        plans,
        save_weights(model),
        personal,
        released,
        refused=refused,
        private=private,
    )
    return outcome


def build_server_app(
    platform_factory: Callable[[], Platform], overrides: Mapping[str, Any] | None = None
) -> ServerApp:
    """A ServerApp for the Simulation Engine (the platform's own virtual nodes) reading
    ``context.run_config`` (pyproject) with ``overrides`` on top."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = RunSpec.from_run_config(dict(context.run_config), dict(overrides or {}))
        run_federation(grid, cfg, platform_factory(), simulated=True)

    return app
