"""BERT-style classifiers: a small encoder trained from scratch, and pretrained MiniLM-L6.

Both pool the encoder's last hidden states with a masked mean and add a linear head.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torch import nn
from transformers import BertConfig, BertModel
from transformers.utils import logging as hf_logging

from models.assets import minilm_dir
from models.lstm import MINILM_VOCAB

MINILM_LAYERS = 6


def _encode(encoder: BertModel, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # Explicit per-example position and segment ids: BERT's defaults broadcast one row
    # over the batch, which gives Opacus per-example gradients of batch size 1.
    batch, length = input_ids.shape
    positions = torch.arange(length, device=input_ids.device).expand(batch, length)
    segments = torch.zeros_like(input_ids)
    out = encoder(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        token_type_ids=segments,
    )
    return _masked_mean(out.last_hidden_state, mask)


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


@dataclass(frozen=True)
class TransformerConfig:
    """A small encoder from scratch; sizes chosen so DP-SGD runs on a CPU in tests."""

    vocab_size: int = MINILM_VOCAB  # the public WordPiece vocabulary
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    max_positions: int = 128
    dropout: float = 0.1

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} should be a positive integer.")
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size should be a multiple of num_heads.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout should be in [0, 1).")


class TransformerClassifier(nn.Module):
    public_prefixes: tuple[str, ...] = ()

    def __init__(self, config: TransformerConfig, num_classes: int) -> None:
        super().__init__()
        bert = BertConfig(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            intermediate_size=config.intermediate_size,
            max_position_embeddings=config.max_positions,
            hidden_dropout_prob=config.dropout,
            attention_probs_dropout_prob=config.dropout,
            type_vocab_size=1,
        )
        self.encoder = BertModel(bert, add_pooling_layer=False)
        self.head = nn.Linear(config.hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(_encode(self.encoder, input_ids, attention_mask))


@dataclass(frozen=True)
class MiniLMConfig:
    """Pretrained MiniLM-L6, fine-tuning only its top ``trainable_layers`` and the head.

    Why not all layers: per-example gradients of 22.7M parameters make DP-SGD slow and
    noisy; the top layer plus head (about 1.8M parameters) adapts the sentence
    representation while the public lower layers stay frozen, and frozen parts are
    rebuilt from the package, so they are never shipped to the server nor stored.
    """

    trainable_layers: int = 1
    dropout: float = 0.1
    # L2-normalize the pooled vector, as the encoder-head family does: then a DP head
    # trained there on MiniLM's vectors is a valid start for this head (LP-FT, Kumar et
    # al. 2022: fit the head on frozen features first, then fine-tune the top layers).
    normalize: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.trainable_layers <= MINILM_LAYERS:
            raise ValueError(f"trainable_layers should be between 0 and {MINILM_LAYERS}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout should be in [0, 1).")


def _load_minilm() -> BertModel:
    path = minilm_dir()
    config = BertConfig(**json.loads((path / "config.json").read_text()))
    # Loading is offline and expected; transformers' progress bars and notes are noise.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = BertModel.from_pretrained(
        str(path), config=config, add_pooling_layer=False, local_files_only=True
    )
    assert isinstance(model, BertModel)
    return model


class MiniLMClassifier(nn.Module):
    def __init__(self, config: MiniLMConfig, num_classes: int) -> None:
        super().__init__()
        self.encoder = _load_minilm()
        frozen = MINILM_LAYERS - config.trainable_layers
        self.public_prefixes = (
            "encoder.embeddings.",
            *(f"encoder.encoder.layer.{i}." for i in range(frozen)),
        )
        for name, param in self.encoder.named_parameters(prefix="encoder"):
            if name.startswith(self.public_prefixes):
                param.requires_grad_(False)
        self.dropout = nn.Dropout(config.dropout)
        self.normalize = config.normalize
        self.head = nn.Linear(self.encoder.config.hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = _encode(self.encoder, input_ids, attention_mask)
        if self.normalize:
            pooled = nn.functional.normalize(pooled, dim=-1)
        return self.head(self.dropout(pooled))
