"""Opacus's ``DPLSTM``: swapped for ``FastDPLSTM`` while attached; per-example gradients of
W_ih, W_hh and both biases from the gradient of the gate pre-activations."""

from __future__ import annotations

import torch
from opacus.layers import DPLSTM
from torch import nn

from clients.fastdp.lstm import FastDPLSTM
from clients.fastdp.per_example import Materialized, Outer, PerExample
from clients.fastdp.rules.base import Rule


class LSTMRule(Rule):
    """Swaps a ``DPLSTM`` for ``FastDPLSTM`` (same parameters) while attached."""

    def __init__(self, name: str, lstm: DPLSTM) -> None:
        self.lstm, self.fused = lstm, FastDPLSTM(lstm)
        super().__init__(name, self.fused.parameters_in_order())

    def _parent(self, model: nn.Module) -> tuple[nn.Module, str]:
        parent, _, child = self.name.rpartition(".")
        return model.get_submodule(parent), child

    def attach(self, model: nn.Module) -> None:
        parent, child = self._parent(model)
        self.fused.train(self.lstm.training)
        self.fused.layer = self
        setattr(parent, child, self.fused)

    def detach(self, model: nn.Module) -> None:
        parent, child = self._parent(model)
        if getattr(parent, child) is self.fused:
            setattr(parent, child, self.lstm)
        self.fused.layer = None

    def per_example(
        self, grads: list[torch.Tensor], batch: int, limit: int
    ) -> list[tuple[torch.Tensor, PerExample]]:
        (x, out, _), (d_pre,) = self.calls[0], grads
        gates, fused = 4 * self.fused.hidden, self.fused
        outs = out.unflatten(-1, (fused.directions, fused.hidden)).unbind(2)
        terms: list[tuple[torch.Tensor, PerExample]] = []
        for d in range(fused.directions):
            dz = d_pre[..., d * gates : (d + 1) * gates]  # gradient of the gate pre-activations
            zero = outs[d][:, :1].new_zeros(outs[d][:, :1].shape)
            # h_{t-1} as seen by step t: the previous output in this direction's time order.
            h_prev = (
                torch.cat([zero, outs[d][:, :-1]], 1)
                if d == 0
                else torch.cat([outs[d][:, 1:], zero], 1)
            )
            for p, term in (
                (fused.w_ih[d], Outer(dz, x, limit)),
                (fused.w_hh[d], Outer(dz, h_prev, limit)),
            ):
                if p.requires_grad:
                    terms.append((p, term))
            if fused.has_bias:
                bias_grad = Materialized(dz.sum(1))
                for p in (fused.b_ih[d], fused.b_hh[d]):
                    if p.requires_grad:
                        terms.append((p, bias_grad))
        return terms
