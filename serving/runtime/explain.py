"""Why a model predicted what it did: per-word attributions of a served model's score.

Integrated gradients (Sundararajan et al. 2017, with Captum) on the input embeddings:
from a baseline where every word's token embeddings are those of ``[PAD]`` (the special
tokens, positions and mask are kept) to the input, the attributions of all tokens sum to
the score of the explained label at the input minus at the baseline, up to the integral's
numerical error, which each explanation reports as ``delta``. The score is the label's
probability, the number the predict route returns.

- ``lstm``, ``transformer``, ``minilm``: the model's own word embeddings.
- ``encoder-head``: the public encoder's input embeddings, through the encoder, its
  masked-mean pooling and normalization, then the tenant's head: words, not the sentence
  vector, are what a user can read.
  The encoder is the float32 one: where the server runs its shared encoder in bf16 or
  int8 (FEDTEXT_SERVE_ENCODER_PRECISION), explained scores may differ from served ones
  by that precision's error.
- A dynamically quantized model has no gradients (int8 kernels): occlusion instead, each
  word replaced by ``[PAD]`` alone (its attribution is the score lost), which does not sum
  to the score difference; ``method`` says which one was used.

Tokens are shown as the user wrote them: word pieces are merged back into the word, and
each word is the slice of the original text its pieces cover (``start``/``end`` index it).
The forward passes here never register hooks on the served modules (they are shared with
concurrent predictions); the embeddings are computed and fed to the rest of the network.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from captum.attr import IntegratedGradients
from tokenizers import Tokenizer
from torch import nn
from torch.nn import functional as F

from models import ModelSpec, spec_encoder, text_inputs
from models.assets import minilm_dir
from models.encoder_head import FAMILY as ENCODER_HEAD

INTEGRATED_GRADIENTS = "integrated-gradients"
OCCLUSION = "occlusion"
_APOSTROPHES = {"'", "\u2019"}


@dataclass(frozen=True)
class WordAttribution:
    token: str  # the word as written in the input
    start: int  # its character span in the input
    end: int
    attribution: float


@dataclass(frozen=True)
class Explanation:
    label: str
    score: float  # the label's probability for the input
    baseline_score: float  # ... for the baseline (every word's tokens [PAD])
    method: str  # integrated-gradients | occlusion
    tokens: list[WordAttribution]
    # sum(attributions) - (score - baseline_score): the integral's error for integrated
    # gradients (completeness); for occlusion, how far the parts are from the whole.
    delta: float
    truncated: bool  # the input was longer than the model reads; later words are not shown


@dataclass
class _Encoded:
    """One text as the model reads it: ids, mask, and each token's span in the text."""

    ids: torch.Tensor  # (1, L)
    mask: torch.Tensor  # (1, L)
    spans: list[tuple[int, int, int] | None]  # (start, end, word) per token; None: special/pad
    truncated: bool


class _Differentiable:
    """A served model split at its input embeddings (no hooks on shared modules)."""

    pad_id: int

    def encode(self, text: str) -> _Encoded:
        raise NotImplementedError

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def probabilities(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if mask.shape[0] != embeddings.shape[0]:
            mask = mask.expand(embeddings.shape[0], -1)
        return torch.softmax(self.logits(embeddings, mask), dim=-1)


@lru_cache(maxsize=1)
def _wordpiece() -> Tokenizer:
    # The same public tokenizer file as models/tokenizer.py, read for its offsets.
    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return tok


class _TokenFamily(_Differentiable):
    """lstm, transformer, minilm: token ids from the public WordPiece tokenizer."""

    def __init__(self, model: nn.Module, spec: ModelSpec) -> None:
        self.model, self.spec = model, spec
        pad = _wordpiece().token_to_id("[PAD]")
        assert pad is not None
        self.pad_id = int(pad)

    def encode(self, text: str) -> _Encoded:
        ids, mask = text_inputs(self.spec, [text])  # exactly what the predict path feeds
        enc = _wordpiece().encode(text)
        length = int(mask.sum())
        kept = list(range(length - 1))  # all but [SEP], which a long input keeps at the end
        spans: list[tuple[int, int, int] | None] = [None] * ids.shape[1]
        for i in kept:
            word = enc.word_ids[i]
            if not enc.special_tokens_mask[i] and word is not None:
                assert enc.ids[i] == int(ids[0, i]), "tokenizer mismatch"
                spans[i] = (*enc.offsets[i], word)
        return _Encoded(ids, mask, spans, truncated=len(enc.ids) > length)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        model = self.model
        if self.spec.family == "lstm":
            table = getattr(model, "embedding", None)
            if table is None:
                return F.embedding(ids, model.get_buffer("frozen_embedding"))
            return table(ids)  # type: ignore[no-any-return]
        return model.encoder.embeddings.word_embeddings(ids)  # type: ignore[no-any-return,union-attr,operator]

    def logits(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Mirrors each family's forward after its embedding lookup (models/lstm.py,
        # models/transformer.py); tests check it gives the served probabilities.
        m: Any = self.model  # the family's modules, by the names its class gives them
        if self.spec.family == "lstm":
            x = torch.tanh(m.proj(embeddings))
            out, _ = m.lstm(x)
            weights = mask.unsqueeze(-1).to(out.dtype)
            pooled = (out * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            return m.head(m.dropout(pooled))  # type: ignore[no-any-return]
        batch, length = mask.shape
        hidden = m.encoder(
            inputs_embeds=embeddings,
            attention_mask=mask,
            position_ids=torch.arange(length).expand(batch, length),
            token_type_ids=torch.zeros_like(mask),
        ).last_hidden_state
        pooled = _masked_mean(hidden, mask)
        if getattr(m, "normalize", False):
            pooled = F.normalize(pooled, dim=-1)
        dropout = getattr(m, "dropout", None)
        return m.head(dropout(pooled) if dropout is not None else pooled)  # type: ignore[no-any-return]


class _EncoderHead(_Differentiable):
    """encoder-head: the public encoder's own tokenizer and input embeddings, then the head."""

    def __init__(self, model: nn.Module, spec: ModelSpec) -> None:
        self.head, self.spec = model, spec
        self.encoder = spec_encoder(spec)
        self.pad_id = int(self.encoder.tokenizer.pad_token_id or 0)
        self.length = min(spec.max_seq_len, self.encoder.max_positions)

    def encode(self, text: str) -> _Encoded:
        text = text.encode("utf-8", "replace").decode("utf-8")  # as SentenceEncoder.encode
        full = self.encoder.tokenizer(text, return_offsets_mapping=True)
        enc = self.encoder.tokenizer(
            text,
            truncation=True,
            max_length=self.length,
            return_tensors="pt",
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
        )
        words = enc.word_ids(0)
        spans: list[tuple[int, int, int] | None] = []
        for i, (start, end) in enumerate(enc["offset_mapping"][0].tolist()):
            special = bool(enc["special_tokens_mask"][0, i]) or words[i] is None
            spans.append(None if special else (start, end, int(words[i])))  # type: ignore[arg-type]
        truncated = len(full["input_ids"]) > enc["input_ids"].shape[1]
        return _Encoded(enc["input_ids"], enc["attention_mask"], spans, truncated)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encoder.model.get_input_embeddings()(ids)  # type: ignore[no-any-return]

    def logits(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Mirrors SentenceEncoder.encode (models/encoders.py) with gradients, then the head.
        hidden = self.encoder.model(inputs_embeds=embeddings, attention_mask=mask)
        pooled = F.normalize(_masked_mean(hidden.last_hidden_state, mask).float(), dim=-1)
        return self.head(pooled)  # type: ignore[no-any-return]


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def differentiable(model: nn.Module, spec: ModelSpec) -> _Differentiable:
    if spec.family == ENCODER_HEAD:
        return _EncoderHead(model, spec)
    if spec.family in ("lstm", "transformer", "minilm"):
        return _TokenFamily(model, spec)
    raise ValueError(f"No explanation for model family {spec.family!r}.")


def _words(text: str, spans: Sequence[tuple[int, int, int] | None]) -> list[list[int]]:
    """Token positions grouped into words as written: a word's pieces, and contractions
    (``don't``: three BERT words, contiguous around an apostrophe) merged back."""
    groups: list[list[int]] = []
    last: tuple[int, int, int] | None = None
    for i, span in enumerate(spans):
        if span is None:
            continue
        start, end, word = span
        joined = last is not None and (
            word == last[2]
            or (
                start == last[1]
                and (text[start:end] in _APOSTROPHES or text[last[0] : last[1]] in _APOSTROPHES)
            )
        )
        if joined:
            groups[-1].append(i)
        else:
            groups.append([i])
        last = span
    return groups


def explain(
    model: nn.Module,
    spec: ModelSpec,
    texts: Sequence[str],
    *,
    label: str | None = None,
    steps: int = 64,
    quantized: bool = False,
) -> list[Explanation]:
    """Word attributions of ``label`` (default: each input's predicted label); blocking.

    Parameters
    ----------
    model, spec
        A served model (eval mode) and its spec.
    steps
        Integration steps (Gauss-Legendre); the error ``delta`` shrinks as they grow.
    quantized
        The model's weights are int8 (no gradients): occlusion is used.
    """
    if label is not None and label not in spec.labels:
        raise ValueError(f"Unknown label {label!r}; this model's labels are {list(spec.labels)}.")
    net = differentiable(model, spec)
    return [_explain_one(net, spec, text, label, steps, quantized) for text in texts]


def _explain_one(
    net: _Differentiable,
    spec: ModelSpec,
    text: str,
    label: str | None,
    steps: int,
    quantized: bool,
) -> Explanation:
    enc = net.encode(text)
    groups = _words(text, enc.spans)
    real = [i for g in groups for i in g]
    baseline_ids = enc.ids.clone()
    baseline_ids[0, real] = net.pad_id
    with torch.no_grad():
        inputs = net.embed(enc.ids)
        baseline = net.embed(baseline_ids)
        probs = net.probabilities(torch.cat([inputs, baseline]), enc.mask)
    target = spec.labels.index(label) if label is not None else int(probs[0].argmax())
    score, base_score = float(probs[0, target]), float(probs[1, target])
    if quantized:
        per_token, method = _occlusion(net, enc, groups, inputs, baseline, target, score), OCCLUSION
    else:
        per_token, method = (
            _integrated_gradients(net, enc, inputs, baseline, target, steps),
            (INTEGRATED_GRADIENTS),
        )
    words = [
        WordAttribution(
            token=text[enc.spans[g[0]][0] : enc.spans[g[-1]][1]],  # type: ignore[index]
            start=enc.spans[g[0]][0],  # type: ignore[index]
            end=enc.spans[g[-1]][1],  # type: ignore[index]
            attribution=float(sum(per_token[i] for i in g)),
        )
        for g in groups
    ]
    total = sum(w.attribution for w in words)
    return Explanation(
        label=spec.labels[target],
        score=score,
        baseline_score=base_score,
        method=method,
        tokens=words,
        delta=total - (score - base_score),
        truncated=enc.truncated,
    )


def _integrated_gradients(
    net: _Differentiable,
    enc: _Encoded,
    inputs: torch.Tensor,
    baseline: torch.Tensor,
    target: int,
    steps: int,
) -> list[float]:
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = net.probabilities
    ig = IntegratedGradients(forward)
    with torch.enable_grad():
        attributions = ig.attribute(
            inputs.detach(),
            baselines=baseline.detach(),
            target=target,
            additional_forward_args=(enc.mask,),
            n_steps=steps,
            internal_batch_size=min(steps, 32),
        )
    per_token: list[float] = attributions.sum(dim=-1)[0].tolist()
    return per_token


def _occlusion(
    net: _Differentiable,
    enc: _Encoded,
    groups: list[list[int]],
    inputs: torch.Tensor,
    baseline: torch.Tensor,
    target: int,
    score: float,
) -> list[float]:
    per_token = [0.0] * inputs.shape[1]
    if not groups:
        return per_token
    variants = inputs.repeat(len(groups), 1, 1)
    for row, group in enumerate(groups):
        variants[row, group] = baseline[0, group]
    with torch.no_grad():
        occluded = net.probabilities(variants, enc.mask)[:, target].tolist()
    for group, value in zip(groups, occluded, strict=True):
        share = (score - value) / len(group)  # the word's score lost, over its pieces
        for i in group:
            per_token[i] = share
    return per_token
