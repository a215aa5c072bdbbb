"""``nn.Embedding``: per-example gradients as rows indexed by token ids."""

from __future__ import annotations

import torch
from torch import nn

from clients.fastdp.per_example import EmbeddingRows, PerExample
from clients.fastdp.rules.base import HookedRule


class EmbeddingRule(HookedRule):
    module: nn.Embedding

    def per_example(
        self, grads: list[torch.Tensor], batch: int, limit: int
    ) -> list[tuple[torch.Tensor, PerExample]]:
        (ids, _), (g,) = self.calls[0], grads
        if ids.shape[0] != batch:
            raise ValueError(f"Fast DP: {self.name!r} ids should be batch first.")
        g = g.reshape(batch, -1, g.shape[-1])
        pad = self.module.padding_idx
        if pad is not None:
            # nn.Embedding never updates its padding row; neither does its gradient here.
            g = g * (ids.reshape(batch, -1, 1) != pad).to(g.dtype)
        return [(self.module.weight, EmbeddingRows(ids, g, self.module.num_embeddings))]
