"""Run a whole federation on one machine with Flower's Simulation Engine."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from clients.client_app import make_client_app
from runs.lifecycle import get_run, record_request
from runs.spec import SIMULATION_ONLY, RunSpec, key
from runs.status import RunStatus
from server.server_app import build_server_app
from tenancy.platform import Platform

log = logging.getLogger("orchestration.simulation")


# Settings the simulated nodes read from the run config (clients/local_data.py).
# privacy-unit user: the nodes read the unit, the user column and k from the run config
# (a simulated node's context.run_config holds only pyproject's defaults).
CLIENT_KEYS = {
    key(n)
    for n in (*SIMULATION_ONLY, "seed", "data_file", "data_files",
              "privacy_unit", "user_column", "max_examples_per_user")
}  # fmt: skip


class SimulationFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class SimulationResult:
    run_id: str
    summary: dict[str, Any]


class SimulationConfig(RunSpec):
    """A simulated federation: one virtual SuperNode per tenant on shares of the demo corpus.

    The run's settings are RunSpec's; these two are the simulating machine's."""

    gpu_fraction: float = Field(
        default=0.0, ge=0, le=1, description="GPU share per virtual client; 0: the CPU."
    )
    inject_fault: str = Field(
        default="", description="TENANT:ROUND: that client raises in that round (testing aid)."
    )
    # The tenants' own data instead of the demo corpus (`fedtext simulate --data`): one
    # file split over the tenants by the partitioning, or one file per tenant. Absolute
    # paths: Ray's workers need not share the caller's working directory.
    data_file: str = Field(default="", description="One CSV/JSONL split over the tenants.")
    data_files: dict[str, str] = Field(
        default_factory=dict, description="Each tenant's own CSV/JSONL file."
    )

    @model_validator(mode="after")
    def _two_tenants(self) -> SimulationConfig:
        if len(self.tenants) < 2:
            raise ValueError("A federation needs at least two tenants.")
        if self.data_file and self.data_files:
            raise ValueError("Give one data file for all tenants, or one file per tenant.")
        if self.data_files and set(self.data_files) != set(self.tenants):
            raise ValueError(
                f"Data files are given for {', '.join(sorted(self.data_files))}; the run's "
                f"tenants are {', '.join(self.tenants)}: give each tenant one file."
            )
        return self

    def server_overrides(self, run_id: str) -> dict[str, Any]:
        """What the simulation's ServerApp reads as its run config."""
        return {**self.server_part(), "run-id": run_id}

    def client_overrides(self) -> dict[str, Any]:
        """What the simulated nodes read: their share of the demo corpus."""
        own_data = {"data-file": self.data_file, "data-files": self.data_files}
        return {
            **{
                k: v
                for k, v in self.run_config().items()
                if k in CLIENT_KEYS and (k not in own_data or own_data[k])
            },
            "inject-fault": self.inject_fault,
        }


def simulate(
    platform: Platform, config: SimulationConfig, run_id: str | None = None
) -> SimulationResult:
    """Run ``config`` to completion; the run's record says what happened."""
    run_id = run_id or uuid.uuid4().hex
    record_request(platform.engine, run_id, config.public(), merge=False)
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
    if run.status == RunStatus.CANCELLED or run.cancelled_by is not None:
        raise SimulationFailed(f"Run {run_id} was cancelled; a cancelled run is not resumed.")
    config = SimulationConfig.parse(json.loads(run.simulation_json))
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
        # Named by the run: a resume first removes what a killed attempt left behind
        # (vectors of tenants' text). The API's worker sets its own per-run directory.
        prefix = f"fedtext-features-{run_id}-"
        for stale in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
            shutil.rmtree(stale, ignore_errors=True)
        scratch = tempfile.mkdtemp(prefix=prefix)
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


def data_labels(config: SimulationConfig) -> tuple[str, ...]:
    """The labels the tenants' files use, when the run names none: one set for all.

    ValueError naming the difference when the tenants' files use different labels.
    """
    from clients.data import read_label_names

    if config.data_file:
        return read_label_names(config.data_file)
    found = {tenant: read_label_names(path) for tenant, path in config.data_files.items()}
    sets = set(found.values())
    if len(sets) > 1:
        every = sorted(set().union(*sets))
        described = "; ".join(f"{t}: {', '.join(labels)}" for t, labels in found.items())
        raise ValueError(
            f"The tenants' files use different labels ({described}). Give every tenant the "
            f"same labels, or name them all with --labels {','.join(every)}."
        )
    return next(iter(sets))


def train_counts(config: SimulationConfig) -> dict[str, int]:
    """Each tenant's training examples, as its node will count them; the tenants' files are
    read (and their labels checked). On the demo corpus: the cap, where one is set."""
    from clients.data import load_labeled_file, train_test_split
    from clients.local_data import split_shared_file

    labels = tuple(config.labels)
    # privacy-unit user: the unit planning counts is users (read from the user column).
    users = config.user_column if config.privacy_unit == "user" else None
    shares = {}
    if config.data_files:
        shares = {t: load_labeled_file(p, labels, users) for t, p in config.data_files.items()}
    elif config.data_file:
        data = load_labeled_file(config.data_file, labels, users)
        parts = len(config.tenants)
        for pid, tenant in enumerate(config.tenants):
            shares[tenant] = split_shared_file(
                data, pid, parts, config.partitioning, config.alpha, config.seed
            )
    elif users:
        raise ValueError(
            "privacy-unit user needs each tenant's own data with a user column (--data "
            "TENANT=FILE or --data FILE); the demo corpus names no authors."
        )
    else:
        cap = config.max_train_examples
        return {t: cap for t in config.tenants} if cap else {}
    counts = {}
    for tenant, share in shares.items():
        if len(share) < 2:
            raise ValueError(
                f"{tenant} has {len(share)} example(s); a tenant needs at least two "
                "(training and held-out test): add data."
            )
        train, _ = train_test_split(share, 0.2, config.seed)
        if users:
            counts[tenant] = train.head(config.max_train_examples or None).num_users()
            continue
        counts[tenant] = min(len(train), config.max_train_examples or len(train))
    return counts


def preflight(config: SimulationConfig, deltas: dict[str, float] | None = None) -> dict[str, int]:
    """The checks of size, batch and labels that planning makes, before anything trains or
    is charged; ValueError saying what to change. Returns the tenants' training counts."""
    from server.planning import PlanRefused, dp_schedule

    counts = train_counts(config)
    for tenant, n in counts.items():
        try:
            dp_schedule(
                tenant_name=tenant,
                num_train=n,
                target_epsilon=config.epsilon,
                # delta must stay below 1/n; an estimate (a cap) must not trip that check
                delta=min((deltas or {}).get(tenant, 1e-5), 0.5 / n),
                batch_size=config.batch_size,
                local_epochs=config.local_epochs,
                rounds=config.rounds,
                personalize_epochs=config.personalize_epochs,
                unit=config.privacy_unit,
            )
        except PlanRefused as exc:
            raise ValueError(f"{exc}.") from None
    return counts
