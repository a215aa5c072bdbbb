"""LSTM text classifier that Opacus can train (embedding -> projection -> BiLSTM -> head)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from opacus.layers import DPLSTM
from safetensors import safe_open
from torch import nn
from torch.nn import functional as F

from models.assets import minilm_dir

MINILM_VOCAB = 30522
MINILM_DIM = 384


@dataclass(frozen=True)
class LSTMConfig:
    vocab_size: int = MINILM_VOCAB
    # "minilm-frozen": MiniLM's public word embeddings, frozen. Per-example gradients of a
    # trainable table cost vocab x dim per example (NOTES.md), and a public, frozen table
    # leaks nothing and is never shipped or stored with the weights.
    embedding: str = "minilm-frozen"
    embed_dim: int = MINILM_DIM
    proj_dim: int = 64
    hidden_dim: int = 64
    bidirectional: bool = True
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.embedding not in ("minilm-frozen", "trainable"):
            raise ValueError(
                f"Unknown embedding {self.embedding!r}: 'minilm-frozen' or 'trainable'."
            )
        if self.embedding == "minilm-frozen" and (
            self.vocab_size != MINILM_VOCAB or self.embed_dim != MINILM_DIM
        ):
            raise ValueError("The MiniLM embedding fixes vocab_size=30522 and embed_dim=384.")
        for name in ("vocab_size", "embed_dim", "proj_dim", "hidden_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} should be a positive integer.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout should be in [0, 1).")


@lru_cache(maxsize=1)
def minilm_word_embeddings() -> torch.Tensor:
    """MiniLM-L6's public word embedding table (30522 x 384), read once per process.

    Standardized to unit variance: the raw table's values have a standard deviation of
    about 0.056, which makes the projection's outputs tiny at initialization and the
    LSTM learn very slowly, most of all under DP-SGD's few noisy steps.
    """
    with safe_open(str(minilm_dir() / "model.safetensors"), "pt") as f:
        table = f.get_tensor("embeddings.word_embeddings.weight").float()
    return (table - table.mean()) / table.std()


class LSTMClassifier(nn.Module):
    def __init__(self, config: LSTMConfig, num_classes: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError("num_classes should be at least 2.")
        self.config = config
        self.embedding: nn.Embedding | None
        if config.embedding == "minilm-frozen":
            # Non-persistent buffer: not in state_dict, so not sent to the server nor stored.
            self.register_buffer("frozen_embedding", minilm_word_embeddings(), persistent=False)
            self.embedding = None
        else:
            self.embedding = nn.Embedding(config.vocab_size, config.embed_dim)
        self.proj = nn.Linear(config.embed_dim, config.proj_dim)
        self.lstm = DPLSTM(
            config.proj_dim,
            config.hidden_dim,
            batch_first=True,
            bidirectional=config.bidirectional,
        )
        out_dim = config.hidden_dim * (2 if config.bidirectional else 1)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(out_dim, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.embedding is None:
            x = F.embedding(input_ids, self.get_buffer("frozen_embedding"))
        else:
            x = self.embedding(input_ids)
        x = torch.tanh(self.proj(x))
        out, _ = self.lstm(x)
        mask = attention_mask.unsqueeze(-1).to(out.dtype)
        # Masked mean: padding positions do not dilute the sentence representation.
        pooled = (out * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        logits = self.head(self.dropout(pooled))
        assert logits.shape == (input_ids.shape[0], self.head.out_features)
        return logits
