"""The clipped sum of per-example gradients over a model's supported layers."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from clients.fastdp.layers import layer_rules
from clients.fastdp.per_example import MATERIALIZE_LIMIT, PerExample


class FastClipper:
    """Per-example clipping for ``model``: ``backward(losses)`` sets each trainable
    parameter's ``.grad`` to the sum over examples of its clipped per-example gradient.

    Use as a context manager around training: it hooks the supported layers (and swaps
    ``DPLSTM`` for ``FastDPLSTM``) on entry and restores the plain model on exit.
    """

    def __init__(
        self, model: nn.Module, max_grad_norm: float, *, materialize_limit: int = MATERIALIZE_LIMIT
    ) -> None:
        if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise ValueError("The clipping norm should be a positive value.")
        self.model, self.max_grad_norm, self.limit = model, max_grad_norm, materialize_limit
        self.layers = layer_rules(model)
        self.params = [p for layer in self.layers for p in layer.params]
        self.per_example_norms: torch.Tensor | None = None
        self.attached = False
        self._root_hook: Any = None

    def _clear(self) -> None:
        for layer in self.layers:
            layer.calls.clear()

    def __enter__(self) -> FastClipper:
        for layer in self.layers:
            layer.attach(self.model)
        # Each forward of the whole model starts a fresh capture (an evaluation forward
        # in between, without backward(), leaves nothing behind).
        self._root_hook = self.model.register_forward_pre_hook(lambda *_: self._clear())
        self.attached = True
        return self

    def __exit__(self, *exc: object) -> None:
        for layer in self.layers:
            layer.detach(self.model)
        if self._root_hook is not None:
            self._root_hook.remove()
            self._root_hook = None
        self._clear()
        self.attached = False

    def zero_batch(self) -> None:
        """An empty Poisson batch: the clipped sum is zero (noise is still added)."""
        for p in self.params:
            p.grad = torch.zeros_like(p)

    def backward(self, losses: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        """Set ``p.grad`` to the sum of clipped per-example gradients of ``losses`` (B,).

        With ``groups`` (B,) (user-level DP: ``groups[i]`` is the user, 0..U-1, of example
        i) the clipped unit is a user instead: each user's per-example gradients are
        averaged, that mean is clipped to the clipping norm as one contribution, and
        ``p.grad`` is the sum over users. Returns the norms before clipping (per example,
        or per user with ``groups``).
        """
        if not self.attached:
            raise RuntimeError("Use FastClipper as a context manager around the forward pass.")
        if losses.dim() != 1:
            raise ValueError("losses should hold one loss per example (reduction='none').")
        batch = losses.shape[0]
        try:
            targets = [t for layer in self.layers for t in layer.targets()]
            grads = list(
                torch.autograd.grad(
                    losses.sum(), targets, allow_unused=True, materialize_grads=True
                )
            )
            terms: list[tuple[torch.Tensor, PerExample]] = []
            for layer in self.layers:
                n = len(layer.targets())
                mine, grads = grads[:n], grads[n:]
                if n:
                    terms += layer.per_example(mine, batch, self.limit)
            # Flat clipping over every trainable parameter (a term shared by two
            # parameters, like an LSTM's two biases, counts once for each).
            if groups is not None:
                if groups.shape != (batch,):
                    raise ValueError("groups should name one user per example.")
                groups = groups.to(losses.device)
                users = int(groups.max()) + 1 if batch else 0
                counts = torch.bincount(groups, minlength=users).to(losses.dtype)
                weights = 1.0 / counts[groups]  # each user's mean gradient
                terms = [(p, term.by_group(groups, weights, users)) for p, term in terms]
                batch = users
            norm_sq = losses.new_zeros(batch)
            for _, term in terms:
                norm_sq = norm_sq + term.norm_sq()
            norms = norm_sq.sqrt()
            clip = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
            summed = {id(p): (p, term.weighted_sum(clip)) for p, term in terms}
            for p in self.params:
                p.grad = summed[id(p)][1].to(p.dtype) if id(p) in summed else torch.zeros_like(p)
        finally:
            self._clear()
        self.per_example_norms = norms.detach()
        return self.per_example_norms
