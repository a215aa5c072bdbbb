"""Run a whole federation on one machine with Flower's Simulation Engine."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from clients.client_app import make_client_app
from models import DEFAULT_FAMILY, families, training_defaults
from runs.lifecycle import get_run, record_request
from runs.status import RunStatus
from server.server_app import build_server_app
from tenancy.platform import Platform

log = logging.getLogger("runs.simulation")


class SimulationFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class SimulationResult:
    run_id: str
    summary: dict[str, Any]


@dataclass(frozen=True)
class SimulationConfig:
    """A simulated federation: one virtual SuperNode per tenant on shares of the demo corpus."""

    tenants: list[str]
    # None: the model family's default (models.training_defaults).
    rounds: int | None = None
    epsilon: float = 3.0
    model: str = DEFAULT_FAMILY
    strategy: str = "fedavg"
    local_epochs: int | None = None
    batch_size: int | None = None  # 0: sized by each tenant's data
    learning_rate: float | None = None
    clip_norm: float = 1.0
    personalize_epochs: int | None = None
    fraction_train: float = 1.0
    proximal_mu: float = 0.01
    client_dp_noise: float = 0.0  # > 0 turns on Flower's server-side fixed-clipping wrapper
    client_dp_clip: float = 10.0
    partitioning: str = "iid"
    alpha: float = 0.5
    max_train_examples: int = 2000
    max_test_examples: int = 500
    seed: int = 7
    secure_mode: bool = True
    gpu_fraction: float = 0.0  # of one GPU per virtual client; 0 keeps clients on the CPU
    inject_fault: str = ""  # "TENANT:ROUND": that client raises in that round (testing aid)
    min_nodes: int = 2  # valid replies a round needs; fewer stops the run (resumable)
    dataset: str = "default"  # the ledger's dataset name, for per-dataset budgets
    model_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Fill what was left out with the family's defaults, so the record shows what ran.
        if self.model in families():
            for name, value in training_defaults(self.model).fill(vars(self)).items():
                object.__setattr__(self, name, value)

    def validate(self) -> None:
        if len(self.tenants) < 2:
            raise ValueError("A federation needs at least two tenants.")
        if len(set(self.tenants)) != len(self.tenants):
            raise ValueError("Tenant names in a federation must be distinct.")
        if not 0 <= self.gpu_fraction <= 1:
            raise ValueError("gpu_fraction should be in [0, 1].")

    def server_overrides(self, run_id: str) -> dict[str, Any]:
        return {
            "run-id": run_id,
            "model": self.model,
            "strategy": self.strategy,
            "rounds": self.rounds,
            "local-epochs": self.local_epochs,
            "batch-size": self.batch_size,
            "learning-rate": self.learning_rate,
            "epsilon": self.epsilon,
            "clip-norm": self.clip_norm,
            "min-nodes": self.min_nodes,
            "fraction-train": self.fraction_train,
            "personalize-epochs": self.personalize_epochs,
            "proximal-mu": self.proximal_mu,
            "client-dp": "fixed" if self.client_dp_noise > 0 else "off",
            "client-dp-noise": self.client_dp_noise or 0.1,
            "client-dp-clip": self.client_dp_clip,
            "secure-mode": self.secure_mode,
            "seed": self.seed,
            "model-config": json.dumps(self.model_config),
            "dataset": self.dataset,
        }

    def client_overrides(self) -> dict[str, Any]:
        return {
            "tenants": ",".join(self.tenants),
            "max-train-examples": self.max_train_examples,
            "max-test-examples": self.max_test_examples,
            "partitioning": self.partitioning,
            "alpha": self.alpha,
            "seed": self.seed,
            "inject-fault": self.inject_fault,
        }


def simulate(
    platform: Platform, config: SimulationConfig, run_id: str | None = None
) -> SimulationResult:
    """Run ``config`` to completion; the run's record says what happened."""
    config.validate()
    run_id = run_id or uuid.uuid4().hex
    record_request(platform.engine, run_id, dataclasses.asdict(config), merge=False)
    return _launch(platform, config, config.server_overrides(run_id), run_id)


def resume(platform: Platform, run_id: str) -> SimulationResult:
    """Continue a killed simulated run from its last checkpoint."""
    run = get_run(platform.engine, run_id)
    if run is None:
        raise SimulationFailed(f"No run {run_id}.")
    if run.simulation_json is None or "superlink" in json.loads(run.simulation_json):
        raise SimulationFailed(f"Run {run_id} was not a simulation; resume it with flwr run.")
    if run.status == RunStatus.COMPLETED:
        raise SimulationFailed(f"Run {run_id} already completed.")
    config = SimulationConfig(**json.loads(run.simulation_json))
    return _launch(platform, config, {"run-id": run_id, "resume": True}, run_id)


@contextlib.contextmanager
def _scratch_cache(path: str | None) -> Iterator[None]:
    try:
        yield
    finally:
        if path is not None:
            os.environ.pop("FEDTEXT_FEATURE_CACHE", None)
            shutil.rmtree(path, ignore_errors=True)


def _launch(
    platform: Platform, config: SimulationConfig, server_overrides: dict[str, Any], run_id: str
) -> SimulationResult:
    from flwr.simulation import run_simulation  # heavy import (Ray), only when simulating

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    failure: BaseException | None = None
    # Virtual nodes run in a pool of Ray actors, so a node's next round may run in
    # another process: a shared vector cache keeps "encode once per node" true.
    scratch = None
    if not os.environ.get("FEDTEXT_FEATURE_CACHE"):
        scratch = tempfile.mkdtemp(prefix="fedtext-features-")
        os.environ["FEDTEXT_FEATURE_CACHE"] = scratch
    with _scratch_cache(scratch), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            run_simulation(
                server_app=build_server_app(lambda: platform, server_overrides),
                client_app=make_client_app(config.client_overrides()),
                num_supernodes=len(config.tenants),
                backend_config={
                    "client_resources": {"num_cpus": 1, "num_gpus": config.gpu_fraction},
                    "init_args": {"include_dashboard": False, "log_to_driver": False},
                },
            )
        except Exception as exc:  # the ServerApp's own error, re-raised by Flower
            failure = exc
    run = get_run(platform.engine, run_id)
    if run is None or (RunStatus(run.status).active and failure is not None):
        raise SimulationFailed(f"The run did not finish: {failure or 'see the log above'}")
    if run.status != RunStatus.COMPLETED:
        raise SimulationFailed(f"Run {run_id} {run.status}: {run.error or 'see the log above'}")
    return SimulationResult(run_id, json.loads(run.summary_json))
