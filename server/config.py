"""Run configuration as the ServerApp reads it (kebab-case keys, as in pyproject)."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Mapping
from typing import Any

from models import (
    DEFAULT_FAMILY,
    ModelSpec,
    TrainingDefaults,
    default_max_seq_len,
    families,
    training_defaults,
)
from privacy.evaluation import DEFAULT_EVAL_NOISE
from privacy.ledger import check_dataset
from server.strategy import strategy_names

# "auto": the model family's own default (models.training_defaults), chosen on public data.
AUTO = "auto"
FAMILY_KEYS = tuple(f.name.replace("_", "-") for f in dataclasses.fields(TrainingDefaults))

DEFAULTS: dict[str, Any] = {
    "run-id": "",
    "model": DEFAULT_FAMILY,
    "model-name": "",
    "rounds": AUTO,
    "local-epochs": AUTO,
    # Expected Poisson batch; 0 sizes it by each tenant's data (privacy.params.dp_batch_size).
    "batch-size": AUTO,
    "learning-rate": AUTO,
    "epsilon": 3.0,
    "clip-norm": 1.0,
    "max-seq-len": AUTO,
    "min-nodes": 2,
    "secure-mode": True,
    "round-timeout": 3600.0,
    "labels": "negative,neutral,positive",
    "strategy": "fedavg",
    "proximal-mu": 0.01,
    "server-learning-rate": 0.1,
    "fraction-train": 1.0,
    "personalize-epochs": AUTO,
    # Standard deviation of the Gaussian noise on each count of the released evaluation
    # confusion matrices (sensitivity 1); 0 releases no evaluation metrics at all.
    "eval-noise": DEFAULT_EVAL_NOISE,
    "client-dp": "off",
    "client-dp-noise": 0.1,
    "client-dp-clip": 10.0,
    "resume": False,
    "seed": 7,
    "model-config": "{}",
    "dataset": "default",
    # Tenants (comma-separated names) that may train in this run; empty: every tenant
    # whose node connects. Nodes of other tenants are refused.
    "participants": "",
    # LP-FT: the id of a completed encoder-head run (MiniLM, the same labels) whose final
    # global DP head starts this `minilm` run's head.
    "init-head-run": "",
    # Keep an encoder-head run's final global head (encrypted under the platform key) for a
    # later init-head-run. Off by default: a kept head keeps its KEK version in use, and it
    # is dropped when any of the run's tenants is deleted.
    "keep-head": False,
}


@dataclasses.dataclass(frozen=True)
class ServerRunConfig:
    run_id: str
    model: str
    model_name: str
    rounds: int
    local_epochs: int
    batch_size: int
    learning_rate: float
    epsilon: float
    clip_norm: float
    max_seq_len: int
    min_nodes: int
    secure_mode: bool
    round_timeout: float
    labels: tuple[str, ...]
    strategy: str
    proximal_mu: float
    server_learning_rate: float
    fraction_train: float
    personalize_epochs: int
    eval_noise: float
    client_dp: str
    client_dp_noise: float
    client_dp_clip: float
    resume: bool
    seed: int
    model_config: dict[str, Any]
    dataset: str
    participants: tuple[str, ...]
    init_head_run: str = ""
    keep_head: bool = False

    @classmethod
    def from_mapping(cls, *layers: Mapping[str, Any]) -> ServerRunConfig:
        """Merge defaults with ``layers`` (later wins) and validate."""
        merged: dict[str, Any] = dict(DEFAULTS)
        for layer in layers:
            merged.update({k: v for k, v in layer.items() if v is not None})
        # Client-side keys share the run config; the server reads only its own.
        try:
            _fill_family_defaults(merged)
            cfg = cls(
                run_id=str(merged["run-id"]) or uuid.uuid4().hex,
                model=str(merged["model"]),
                model_name=str(merged["model-name"]) or str(merged["model"]),
                rounds=int(merged["rounds"]),
                local_epochs=int(merged["local-epochs"]),
                batch_size=int(merged["batch-size"]),
                learning_rate=float(merged["learning-rate"]),
                epsilon=float(merged["epsilon"]),
                clip_norm=float(merged["clip-norm"]),
                max_seq_len=int(merged["max-seq-len"]),
                min_nodes=int(merged["min-nodes"]),
                secure_mode=_as_bool(merged["secure-mode"]),
                round_timeout=float(merged["round-timeout"]),
                labels=tuple(s.strip() for s in str(merged["labels"]).split(",") if s.strip()),
                strategy=str(merged["strategy"]).lower(),
                proximal_mu=float(merged["proximal-mu"]),
                server_learning_rate=float(merged["server-learning-rate"]),
                fraction_train=float(merged["fraction-train"]),
                personalize_epochs=int(merged["personalize-epochs"]),
                eval_noise=float(merged["eval-noise"]),
                client_dp=str(merged["client-dp"]).lower(),
                client_dp_noise=float(merged["client-dp-noise"]),
                client_dp_clip=float(merged["client-dp-clip"]),
                resume=_as_bool(merged["resume"]),
                seed=int(merged["seed"]),
                model_config=_json_object(merged["model-config"]),
                dataset=check_dataset(str(merged["dataset"])),
                participants=tuple(
                    s.strip() for s in str(merged["participants"]).split(",") if s.strip()
                ),
                init_head_run=str(merged["init-head-run"]).strip(),
                keep_head=_as_bool(merged["keep-head"]),
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"Invalid run configuration: {exc}") from None
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.model not in families():
            raise ValueError(f"Unknown model family {self.model!r}; known: {families()}.")
        if self.rounds < 1:
            raise ValueError("rounds should be a positive integer.")
        if self.local_epochs < 1:
            raise ValueError("local-epochs should be a positive integer.")
        if self.batch_size < 0:
            raise ValueError("batch-size should be a positive integer, or 0 to size it by data.")
        if not self.learning_rate > 0:
            raise ValueError("learning-rate should be a positive value.")
        if not self.epsilon > 0:
            raise ValueError("The target epsilon should be a positive value.")
        if not self.clip_norm > 0:
            raise ValueError("The clipping norm should be a positive value.")
        if self.min_nodes < 1:
            raise ValueError("min-nodes should be a positive integer.")
        if len(self.labels) < 2:
            raise ValueError("labels should list at least two classes.")
        self.spec()  # an invalid model configuration fails here, before any node is asked
        if self.strategy not in strategy_names():
            raise ValueError(f"Unknown strategy {self.strategy!r}; known: {strategy_names()}.")
        if self.proximal_mu < 0:
            raise ValueError("proximal-mu should be zero or positive.")
        if not self.server_learning_rate > 0:
            raise ValueError("server-learning-rate should be a positive value.")
        if not 0 < self.fraction_train <= 1:
            raise ValueError("fraction-train should be in (0, 1].")
        if self.personalize_epochs < 0:
            raise ValueError("personalize-epochs should be zero (off) or positive.")
        if not (self.eval_noise == 0 or 0.5 <= self.eval_noise < 1e6):
            raise ValueError("eval-noise should be 0 (no released evaluation) or at least 0.5.")
        if self.client_dp not in ("off", "fixed"):
            raise ValueError("client-dp should be 'off' or 'fixed' (server-side fixed clipping).")
        if self.init_head_run and not (
            self.model == "minilm" and self.spec().family_config().normalize
        ):
            raise ValueError(
                "init-head-run starts a minilm model from an encoder-head run's head: use "
                'model minilm with model-config {"normalize": true}.'
            )
        if len(set(self.participants)) != len(self.participants):
            raise ValueError("participants should name each tenant once.")
        if self.participants and len(self.participants) < self.min_nodes:
            raise ValueError(
                f"{len(self.participants)} participant(s) cannot meet min-nodes {self.min_nodes}."
            )
        if self.client_dp == "fixed" and not (self.client_dp_noise > 0 and self.client_dp_clip > 0):
            raise ValueError("client-dp-noise and client-dp-clip should be positive values.")

    def spec(self) -> ModelSpec:
        return ModelSpec.create(
            self.model, list(self.labels), max_seq_len=self.max_seq_len, **self.model_config
        )

    def public(self) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }


def _fill_family_defaults(merged: dict[str, Any]) -> None:
    """Replace "auto" (or an empty value) by the chosen family's default, in place."""
    family = str(merged["model"])
    if family not in families():
        raise ValueError(f"Unknown model family {family!r}; known: {families()}.")
    left_out = {key for key in FAMILY_KEYS if str(merged[key]).strip().lower() in (AUTO, "")}
    given = {key.replace("-", "_"): None if key in left_out else merged[key] for key in FAMILY_KEYS}
    for name, value in training_defaults(family).fill(given).items():
        merged[name.replace("_", "-")] = value
    if str(merged["max-seq-len"]).strip().lower() in (AUTO, "", "0"):
        merged["max-seq-len"] = default_max_seq_len(family)


def _json_object(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return dict(value)
    parsed = json.loads(str(value) or "{}")
    if not isinstance(parsed, dict):
        raise ValueError("model-config should be a JSON object")
    return parsed


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean, got {value!r}")
