"""``nn.LayerNorm``: per-example gradients of its affine weight and bias."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from clients.fastdp.per_example import Materialized, PerExample
from clients.fastdp.rules.base import HookedRule


class LayerNormRule(HookedRule):
    module: nn.LayerNorm

    def per_example(
        self, grads: list[torch.Tensor], batch: int, limit: int
    ) -> list[tuple[torch.Tensor, PerExample]]:
        (x, _), (g,) = self.calls[0], grads
        shape = tuple(self.module.normalized_shape)
        x_hat = F.layer_norm(x, shape, eps=self.module.eps)
        reduce = tuple(range(1, x.dim() - len(shape)))
        terms: list[tuple[torch.Tensor, PerExample]] = []
        if self.module.weight is not None and self.module.weight.requires_grad:
            terms.append((self.module.weight, Materialized((g * x_hat).sum(reduce))))
        if self.module.bias is not None and self.module.bias.requires_grad:
            terms.append((self.module.bias, Materialized(g.sum(reduce))))
        return terms
