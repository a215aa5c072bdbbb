"""The default family: a frozen public sentence encoder and a small private head.

DP-SGD from scratch on a few thousand examples drowns in noise; on strong public
features it loses little (Tramer & Boneh 2021; Li et al. 2022). Only the head is
trained, shipped, aggregated, stored and encrypted: a linear layer (about 1.2k
parameters for three classes) or a one-hidden-layer MLP. The encoder is named, with the
SHA-256 of its files, in the config, and rebuilt from its directory wherever it runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.encoders import DEFAULT_ENCODER
from models.runtimes import LEGACY_RUNTIME, RUNTIMES

FAMILY = "encoder-head"


@dataclass(frozen=True)
class EncoderHeadConfig:
    encoder: str = DEFAULT_ENCODER
    # Filled from the encoder's files when the spec is created (ModelSpec.create).
    encoder_sha256: str = ""
    encoder_dim: int = 384
    # The runtime variant that computed the vectors the head was trained on
    # (models/runtimes.py); the head is served on that variant only. Absent from specs
    # made before variants existed: those were trained on torch-fp32. New specs get
    # models.runtimes.DEFAULT_RUNTIME (ModelSpec.create).
    encoder_runtime: str = LEGACY_RUNTIME
    # 0: softmax regression on the sentence vector (the DP default: fewest parameters,
    # so the least noise per coordinate). > 0: one hidden layer of this width.
    hidden_dim: int = 0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not self.encoder:
            raise ValueError("encoder should name an encoder.")
        if self.encoder_dim <= 0:
            raise ValueError("encoder_dim should be a positive integer.")
        if self.hidden_dim < 0:
            raise ValueError("hidden_dim should be zero (linear head) or positive.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout should be in [0, 1).")
        if self.encoder_runtime not in RUNTIMES:
            raise ValueError(
                f"Unknown encoder_runtime {self.encoder_runtime!r}; known: {list(RUNTIMES)}."
            )
        if self.encoder_sha256 and len(self.encoder_sha256) != 64:
            raise ValueError("encoder_sha256 should be a SHA-256 hex digest.")


class EncoderHeadClassifier(nn.Module):
    """The private head alone; its input is the encoder's sentence vectors ``(B, dim)``."""

    public_prefixes: tuple[str, ...] = ()

    def __init__(self, config: EncoderHeadConfig, num_classes: int) -> None:
        super().__init__()
        self.dim = config.encoder_dim
        layers: list[nn.Module] = [nn.Dropout(config.dropout)] if config.dropout else []
        if config.hidden_dim:
            layers += [nn.Linear(self.dim, config.hidden_dim), nn.Tanh()]
            layers.append(nn.Linear(config.hidden_dim, num_classes))
        else:
            layers.append(nn.Linear(self.dim, num_classes))
        self.head = nn.Sequential(*layers)
        # Start from uniform predictions: a random head's first steps would only undo
        # its own initial bias, spending privacy on nothing.
        last = self.head[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        assert features.dim() == 2 and features.shape[1] == self.dim, features.shape
        return self.head(features)
