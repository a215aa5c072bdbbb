"""Run a whole federation on one machine with Flower's Simulation Engine."""

from __future__ import annotations

import json
import logging
import os
import uuid
import warnings
from dataclasses import dataclass
from typing import Any

from sqlmodel import Session

from clients.client_app import make_client_app
from server.server_app import build_server_app
from tenancy.platform import Platform
from tenancy.tables import TrainingRun

log = logging.getLogger("fedtext.simulation")


class SimulationFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class SimulationResult:
    run_id: str
    summary: dict[str, Any]


def simulate(
    platform: Platform,
    *,
    tenants: list[str],
    rounds: int,
    epsilon: float,
    model: str = "lstm",
    local_epochs: int = 1,
    batch_size: int = 64,
    learning_rate: float = 0.05,
    clip_norm: float = 1.0,
    max_train_examples: int = 2000,
    max_test_examples: int = 500,
    seed: int = 7,
    secure_mode: bool = True,
    run_id: str | None = None,
) -> SimulationResult:
    """Train ``tenants`` (one virtual SuperNode each) on IID shares of the demo corpus."""
    if len(tenants) < 2:
        raise ValueError("A federation needs at least two tenants.")
    if len(set(tenants)) != len(tenants):
        raise ValueError("Tenant names in a federation must be distinct.")
    run_id = run_id or uuid.uuid4().hex
    server_overrides = {
        "run-id": run_id,
        "model": model,
        "rounds": rounds,
        "local-epochs": local_epochs,
        "batch-size": batch_size,
        "learning-rate": learning_rate,
        "epsilon": epsilon,
        "clip-norm": clip_norm,
        "min-nodes": len(tenants),
        "secure-mode": secure_mode,
    }
    client_overrides = {
        "tenants": ",".join(tenants),
        "max-train-examples": max_train_examples,
        "max-test-examples": max_test_examples,
        "seed": seed,
    }
    from flwr.simulation import run_simulation  # heavy import (Ray), only when simulating

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    failure: BaseException | None = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            run_simulation(
                server_app=build_server_app(lambda: platform, server_overrides),
                client_app=make_client_app(client_overrides),
                num_supernodes=len(tenants),
                backend_config={
                    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                    "init_args": {"include_dashboard": False, "log_to_driver": False},
                },
            )
        except Exception as exc:  # the ServerApp's own error, re-raised by Flower
            failure = exc
    with Session(platform.engine) as session:
        run = session.get(TrainingRun, run_id)
    if run is None:
        raise SimulationFailed(f"The ServerApp never started: {failure or 'see the log above'}")
    if run.status != "completed":
        raise SimulationFailed(f"Run {run_id} {run.status}: {run.error or 'see the log above'}")
    return SimulationResult(run_id, json.loads(run.summary_json))
