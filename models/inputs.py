"""What a model of a given spec reads: text -> the tensors its forward takes.

Token families read (input_ids, attention_mask) from the public WordPiece tokenizer,
padded to ``max_seq_len``; the encoder-head family reads sentence vectors from its
public encoder, which must be the one the spec names (same file hash).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from models.encoder_head import FAMILY as ENCODER_HEAD
from models.encoders import SentenceEncoder, check_encoder, load_encoder
from models.runtimes import VectorRuntime, load_runtime
from models.spec import ModelSpec
from models.tokenizer import load_tokenizer


def spec_encoder(spec: ModelSpec, device: torch.device | None = None) -> SentenceEncoder:
    """The shared encoder of an encoder-head spec, checked against the spec's hash."""
    config = spec.family_config()
    encoder = load_encoder(config.encoder, device)
    check_encoder(encoder, config.encoder, config.encoder_sha256)
    if encoder.dim != config.encoder_dim:
        raise ValueError(f"Encoder {config.encoder!r} gives {encoder.dim}-dim vectors, "
                         f"the head expects {config.encoder_dim}.")  # fmt: skip
    return encoder


def spec_runtime(spec: ModelSpec, device: torch.device | None = None) -> VectorRuntime:
    """The runtime variant an encoder-head spec was trained on, its encoder checked."""
    encoder = spec_encoder(spec, device)
    return load_runtime(encoder.ref, spec.family_config().encoder_runtime, device)


def text_inputs(
    spec: ModelSpec, texts: Sequence[str], device: torch.device | None = None
) -> tuple[torch.Tensor, ...]:
    """The forward inputs of ``spec``'s model for ``texts`` (on the CPU)."""
    if spec.family == ENCODER_HEAD:
        # The spec's runtime variant: a node's vectors are the ones a server applies it to.
        return (spec_runtime(spec, device).encode(texts, spec.max_seq_len),)
    enc = load_tokenizer().encode(texts, spec.max_seq_len)
    return (enc.input_ids, enc.attention_mask)
