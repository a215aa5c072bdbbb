"""The public WordPiece tokenizer (MiniLM-L6's vocabulary, never fitted on tenant text)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from tokenizers import Tokenizer

from models.assets import minilm_dir


@dataclass(frozen=True)
class Encoded:
    input_ids: torch.Tensor  # (batch, seq) int64
    attention_mask: torch.Tensor  # (batch, seq) int64, 1 for real tokens


class PublicTokenizer:
    """Encodes text to fixed-length id tensors with the public WordPiece vocabulary."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._tok.no_padding()
        self._tok.no_truncation()
        pad_id = self._tok.token_to_id("[PAD]")
        if pad_id is None:
            raise ValueError("The public vocabulary has no [PAD] token.")
        self.pad_id = int(pad_id)
        self.vocab_size = int(self._tok.get_vocab_size())

    def encode(self, texts: Sequence[str], max_len: int) -> Encoded:
        """Encode ``texts`` to ``(len(texts), max_len)`` tensors, truncating long inputs."""
        if max_len < 3:
            raise ValueError("max_len must be at least 3 ([CLS], one token, [SEP]).")
        pad = self.pad_id
        id_rows, mask_rows = [], []
        # Plain lists, one tensor at the end: per-row tensor writes cost more than the
        # tokenizer itself on the serving path.
        for enc in self._tok.encode_batch(list(texts)):
            row = enc.ids
            if len(row) > max_len:
                row = row[: max_len - 1] + row[-1:]  # keep [SEP] at the end of a long input
            fill = max_len - len(row)
            id_rows.append(row + [pad] * fill)
            mask_rows.append([1] * len(row) + [0] * fill)
        return Encoded(
            torch.tensor(id_rows, dtype=torch.long), torch.tensor(mask_rows, dtype=torch.long)
        )

    def tokens(self, text: str) -> list[str]:
        return list(self._tok.encode(text).tokens)


@lru_cache
def load_tokenizer() -> PublicTokenizer:
    """Load the public tokenizer from the installed MiniLM package (offline)."""
    return PublicTokenizer(Tokenizer.from_file(str(minilm_dir() / "tokenizer.json")))
