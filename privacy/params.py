"""DP-SGD parameters: what the server asks for and what a client reports it applied."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

MECHANISM = "subsampled_gaussian"


@dataclasses.dataclass(frozen=True)
class DPParams:
    """One DP-SGD release: ``steps`` Poisson-subsampled Gaussian steps.

    The privacy unit is one training example of one tenant.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    delta: float
    mechanism: str = MECHANISM

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError("The noise multiplier should be a positive value.")
        if not 0 < self.sample_rate <= 1:
            raise ValueError("The sample rate should be in (0, 1].")
        if self.steps < 1:
            raise ValueError("The number of steps should be a positive integer.")
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError("The clipping norm should be a positive value.")
        if not 0 < self.delta < 1:
            raise ValueError("delta should be in (0, 1).")
        if self.mechanism != MECHANISM:
            raise ValueError(f"Unknown mechanism {self.mechanism!r}.")

    def to_config(self, prefix: str = "dp-") -> dict[str, Any]:
        """Flat, kebab-case keys for a Flower ConfigRecord."""
        return {
            f"{prefix}{f.name.replace('_', '-')}": getattr(self, f.name)
            for f in dataclasses.fields(self)
        }

    @classmethod
    def from_config(cls, config: Any, prefix: str = "dp-") -> DPParams:
        try:
            return cls(
                noise_multiplier=float(config[f"{prefix}noise-multiplier"]),
                sample_rate=float(config[f"{prefix}sample-rate"]),
                steps=int(config[f"{prefix}steps"]),
                clip_norm=float(config[f"{prefix}clip-norm"]),
                delta=float(config[f"{prefix}delta"]),
                mechanism=str(config[f"{prefix}mechanism"]),
            )
        except KeyError as exc:
            raise ValueError(f"DP parameters are incomplete: missing {exc.args[0]!r}.") from exc

    def matches(self, other: DPParams, rel_tol: float = 1e-9) -> bool:
        """True when ``other`` applied exactly these parameters (floats to ``rel_tol``)."""
        return (
            self.mechanism == other.mechanism
            and self.steps == other.steps
            and math.isclose(self.noise_multiplier, other.noise_multiplier, rel_tol=rel_tol)
            and math.isclose(self.sample_rate, other.sample_rate, rel_tol=rel_tol)
            and math.isclose(self.clip_norm, other.clip_norm, rel_tol=rel_tol)
            and math.isclose(self.delta, other.delta, rel_tol=rel_tol)
        )


def poisson_schedule(num_examples: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """Sample rate and steps of ``epochs`` passes with Poisson sampling at ``batch_size``.

    Mirrors Opacus's DPDataLoader: q = 1 / ceil(n / B), ceil(n / B) steps per epoch.
    """
    if num_examples < 1:
        raise ValueError("A tenant needs at least one training example.")
    if batch_size < 1 or epochs < 1:
        raise ValueError("batch_size and epochs should be positive integers.")
    batches = math.ceil(num_examples / batch_size)
    return 1.0 / batches, batches * epochs


# DP-SGD wants large expected batches (the noise is added once per batch; Li et al. 2022,
# Ponomareva et al. 2023): about a tenth of the data per step, within these bounds.
AUTO_BATCH_FRACTION = 10
AUTO_BATCH_MIN, AUTO_BATCH_MAX = 64, 1024


def dp_batch_size(num_examples: int, requested: int) -> int:
    """``requested``, or when it is 0 the expected batch for ``num_examples``:
    n / 10, at least 64 (or n when smaller) and at most 1,024."""
    if requested > 0:
        return requested
    if requested < 0:
        raise ValueError("batch_size should be positive, or 0 to size it by the data.")
    wanted = max(AUTO_BATCH_MIN, min(AUTO_BATCH_MAX, num_examples // AUTO_BATCH_FRACTION))
    return max(1, min(wanted, num_examples))
