"""What the HTTP service needs to know beyond the platform handles."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from privacy.budget import DEFAULT_MAX_EPSILON


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def default_inference_threads() -> int:
    # Half the cores run forward passes; the event loop (HTTP, JSON, auth, tokenizer glue)
    # keeps the rest. Measured on 2 cores: 1 forward thread beats 2 under load (bench/serving.py).
    return max(1, available_cores() // 2)


@dataclass(frozen=True)
class ServingConfig:
    operator_token: str | None = None  # None: the operator routes answer 503
    max_predict_inputs: int = 64
    max_input_chars: int = 2000
    # Model cache: both bounds hold; the least recently used model goes first.
    cache_models: int = 32
    cache_bytes: int = 512 * 2**20
    # Micro-batching: a batch leaves when it holds max_batch inputs or after max_wait_ms
    # (once a forward slot is free). max_batch=1 turns batching off.
    max_batch: int = 64
    max_wait_ms: float = 2.0
    inference_threads: int = 1
    # torch intra-op threads per process; None leaves torch's setting alone (tests, demo).
    torch_threads: int | None = None
    # Seconds the predict path reuses a credential's and a deployment's database answer
    # (serving/runtime/lookups.py); 0 asks the database on every request.
    lookup_ttl_s: float = 1.0
    # The largest epsilon budget a tenant or operator may set over HTTP (422 beyond).
    max_budget_epsilon: float = DEFAULT_MAX_EPSILON
    # Live API keys one tenant may hold (POST /v1/keys answers 409 beyond).
    max_keys_per_tenant: int = 100
    # encoder-head models: one encoder per process batched across tenants, private heads
    # applied after (serving/runtime/shared_encoder.py); False serves them per model like the rest.
    shared_encoder: bool = True
    encoder_runtime: str = "torch-fp32"  # models/runtimes.py: torch-fp32 | onnx-fp32 | onnx-int8
    encoder_precision: str = "fp32"  # torch-fp32 runtime only: fp32 (exact) | bf16 | int8 (CPU)
    encoder_device: str = "auto"  # auto (CUDA when present) | cpu | cuda

    def __post_init__(self) -> None:
        if self.cache_models < 1 or self.cache_bytes < 1:
            raise ValueError("cache_models and cache_bytes should be positive.")
        if self.max_batch < 1:
            raise ValueError("max_batch should be at least 1.")
        if self.max_wait_ms < 0:
            raise ValueError("max_wait_ms should be zero or positive.")
        if self.inference_threads < 1:
            raise ValueError("inference_threads should be at least 1.")
        if not (math.isfinite(self.max_budget_epsilon) and self.max_budget_epsilon > 0):
            raise ValueError("max_budget_epsilon should be a positive finite number.")
        if self.lookup_ttl_s < 0:
            raise ValueError("lookup_ttl_s should be zero or positive.")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError("torch_threads should be at least 1.")
