"""What the HTTP service needs to know beyond the platform handles."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServingConfig:
    operator_token: str | None = None  # None: the operator routes answer 503
    max_predict_inputs: int = 64
    max_input_chars: int = 2000
    cache_models: int = 32
