"""Run configuration as the ServerApp reads it (kebab-case keys, as in pyproject)."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping
from typing import Any

from models import families

DEFAULTS: dict[str, Any] = {
    "run-id": "",
    "model": "lstm",
    "model-name": "",
    "rounds": 2,
    "local-epochs": 1,
    "batch-size": 64,
    "learning-rate": 0.05,
    "epsilon": 3.0,
    "clip-norm": 1.0,
    "max-seq-len": 48,
    "min-nodes": 2,
    "secure-mode": True,
    "round-timeout": 3600.0,
    "labels": "negative,neutral,positive",
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

    @classmethod
    def from_mapping(cls, *layers: Mapping[str, Any]) -> ServerRunConfig:
        """Merge defaults with ``layers`` (later wins) and validate."""
        merged: dict[str, Any] = dict(DEFAULTS)
        for layer in layers:
            merged.update({k: v for k, v in layer.items() if v is not None})
        # Client-side keys share the run config; the server reads only its own.
        try:
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
        if self.batch_size < 1:
            raise ValueError("batch-size should be a positive integer.")
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

    def public(self) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean, got {value!r}")
