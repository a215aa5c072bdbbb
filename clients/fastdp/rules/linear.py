"""``nn.Linear``: weight terms from input and output-gradient outer products, bias terms
from the summed output gradient."""

from __future__ import annotations

import torch
from torch import nn

from clients.fastdp.per_example import Materialized, Outer, PerExample, as_sequence
from clients.fastdp.rules.base import HookedRule


class LinearRule(HookedRule):
    module: nn.Linear

    def per_example(
        self, grads: list[torch.Tensor], batch: int, limit: int
    ) -> list[tuple[torch.Tensor, PerExample]]:
        (x, _), (g,) = self.calls[0], grads
        a, g = as_sequence(x, batch, self.name), as_sequence(g, batch, self.name)
        terms: list[tuple[torch.Tensor, PerExample]] = []
        if self.module.weight.requires_grad:
            terms.append((self.module.weight, Outer(g, a, limit)))
        if self.module.bias is not None and self.module.bias.requires_grad:
            terms.append((self.module.bias, Materialized(g.sum(1))))
        return terms
