"""Fast DP-SGD clipping: the same clipped sum as Opacus, without per-example autograd.

Opacus's hooks build every per-example gradient inside the backward pass, and its
``DPLSTM`` runs one Python step (two small linear layers) per token. Here one forward
and one backward that stops at the trainable layers' outputs (no weight gradients are
formed) give, per layer, its input ``a`` and the gradient ``g`` of its output. A weight's
per-example gradient is ``sum_t g_t a_t^T``; from these pairs we form either the
per-example gradients with one batched matrix product (when they fit in memory), or
only their norms, ``sum_{t,s} (g_t . g_s)(a_t . a_s)`` ("ghost" norms, Li et al. 2021),
and then the clipped sum ``sum_i c_i G_i`` directly (book-keeping, Bu et al. 2023), so no
second backward pass is needed.

The privacy mechanism is Opacus's: its Poisson data loader, its noise
(``DPOptimizerFastGradientClipping`` adds N(0, sigma^2 C^2) to the clipped sum and divides
by the expected batch size) and its accountant hook. Only the clipped sum is computed here,
with Opacus's clip factor ``min(1, C / (||g_i|| + 1e-6))`` over all trainable parameters
(flat clipping).
"""

from __future__ import annotations

import math
import secrets
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.layers import DPLSTM
from opacus.optimizers import DPOptimizer, get_optimizer_class
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

# Per-example gradients of one tensor are formed when they take at most this many
# elements (64 MiB in float32); larger ones use ghost norms.
MATERIALIZE_LIMIT = 1 << 24


class _PerExample:
    """One parameter's per-example gradients, given implicitly."""

    def norm_sq(self) -> torch.Tensor:  # (B,)
        raise NotImplementedError

    def weighted_sum(self, c: torch.Tensor) -> torch.Tensor:  # sum_i c_i G_i
        raise NotImplementedError

    def materialized(self) -> torch.Tensor | None:  # (B, *param.shape), when formed
        return None

    def by_group(self, groups: torch.Tensor, weights: torch.Tensor, count: int) -> _Materialized:
        """Per-group gradients sum_{i in u} w_i G_i (user-level DP: one row per user)."""
        grads = self.materialized()
        if grads is None:
            raise ValueError(
                "Fast DP: user-level clipping needs each layer's per-example gradients in "
                f"memory (at most {MATERIALIZE_LIMIT} values per batch); this layer's are "
                "larger: lower the batch size or train with privacy-unit example."
            )
        w = weights.to(grads.dtype).reshape(-1, *([1] * (grads.dim() - 1)))
        out = grads.new_zeros((count, *grads.shape[1:]))
        return _Materialized(out.index_add_(0, groups, grads * w))


class _Materialized(_PerExample):
    def __init__(self, grads: torch.Tensor) -> None:
        self.grads = grads  # (B, *param.shape)

    def norm_sq(self) -> torch.Tensor:
        return self.grads.reshape(len(self.grads), -1).pow(2).sum(1)

    def weighted_sum(self, c: torch.Tensor) -> torch.Tensor:
        return torch.tensordot(c, self.grads, dims=1)

    def materialized(self) -> torch.Tensor | None:
        return self.grads


class _Outer(_PerExample):
    """G_i = sum_t g_it a_it^T for g (B, T, out) and a (B, T, in)."""

    def __init__(self, g: torch.Tensor, a: torch.Tensor, limit: int) -> None:
        self.g, self.a = g, a
        batch, _, d_out = g.shape
        self.grads = (
            torch.bmm(g.transpose(1, 2), a) if batch * d_out * a.shape[-1] <= limit else None
        )

    def norm_sq(self) -> torch.Tensor:
        if self.grads is not None:
            return self.grads.pow(2).sum((1, 2))
        # ||sum_t g_t a_t^T||_F^2 = sum_{t,s} (g_t . g_s)(a_t . a_s)
        gram_a = torch.bmm(self.a, self.a.transpose(1, 2))
        gram_g = torch.bmm(self.g, self.g.transpose(1, 2))
        return (gram_a * gram_g).sum((1, 2))

    def weighted_sum(self, c: torch.Tensor) -> torch.Tensor:
        if self.grads is not None:
            return torch.tensordot(c, self.grads, dims=1)
        cg = (self.g * c[:, None, None]).flatten(0, 1)
        return cg.t() @ self.a.flatten(0, 1)

    def materialized(self) -> torch.Tensor | None:
        return self.grads


class _EmbeddingRows(_PerExample):
    """G_i = sum_t onehot(id_it) g_it^T: never formed (vocabulary x dim per example)."""

    def __init__(self, ids: torch.Tensor, g: torch.Tensor, num_embeddings: int) -> None:
        self.ids, self.g, self.rows = ids.reshape(len(ids), -1), g, num_embeddings

    def norm_sq(self) -> torch.Tensor:
        same = self.ids[:, :, None] == self.ids[:, None, :]
        gram = torch.bmm(self.g, self.g.transpose(1, 2))
        return (gram * same).sum((1, 2))

    def weighted_sum(self, c: torch.Tensor) -> torch.Tensor:
        out = self.g.new_zeros(self.rows, self.g.shape[-1])
        return out.index_add_(0, self.ids.flatten(), (self.g * c[:, None, None]).flatten(0, 1))


def _as_sequence(x: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """(B, ..., d) -> (B, T, d); refuses a tensor whose first dimension is not the batch."""
    if x.dim() < 2 or x.shape[0] != batch:
        raise ValueError(
            f"Fast DP: {name} got a tensor of shape {tuple(x.shape)}; the batch of {batch} "
            "examples should be its first dimension."
        )
    return x.reshape(batch, -1, x.shape[-1])


class _Layer:
    """A trainable module: captures what one forward needs for per-example gradients."""

    def __init__(self, name: str, params: list[nn.Parameter]) -> None:
        self.name, self.params = name, params
        self.calls: list[tuple[Any, ...]] = []

    def record(self, *captured: Any) -> None:
        if not torch.is_grad_enabled():
            return
        if self.calls:
            raise ValueError(
                f"Fast DP: module {self.name!r} ran twice in one forward pass; per-example "
                "gradients of reused modules are not supported here (use engine='opacus')."
            )
        self.calls.append(captured)

    def targets(self) -> list[torch.Tensor]:
        """Tensors of the last forward whose gradients this layer needs."""
        return [self.calls[0][-1]] if self.calls else []

    def per_example(
        self, grads: list[torch.Tensor], batch: int, limit: int
    ) -> list[tuple[torch.Tensor, _PerExample]]:
        raise NotImplementedError

    def attach(self, model: nn.Module) -> None:
        raise NotImplementedError

    def detach(self, model: nn.Module) -> None:
        raise NotImplementedError


class _HookedLayer(_Layer):
    def __init__(self, name: str, module: nn.Module, params: list[nn.Parameter]) -> None:
        super().__init__(name, params)
        self.module = module
        self.handle: Any = None

    def attach(self, model: nn.Module) -> None:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
            self.record(inputs[0].detach(), output)

        self.handle = self.module.register_forward_hook(hook)

    def detach(self, model: nn.Module) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


class _LinearLayer(_HookedLayer):
    module: nn.Linear

    def per_example(
        self, grads: list[torch.Tensor], batch: int, limit: int
    ) -> list[tuple[torch.Tensor, _PerExample]]:
        (x, _), (g,) = self.calls[0], grads
        a, g = _as_sequence(x, batch, self.name), _as_sequence(g, batch, self.name)
        terms: list[tuple[torch.Tensor, _PerExample]] = []
        if self.module.weight.requires_grad:
            terms.append((self.module.weight, _Outer(g, a, limit)))
        if self.module.bias is not None and self.module.bias.requires_grad:
            terms.append((self.module.bias, _Materialized(g.sum(1))))
        return terms


class _EmbeddingLayer(_HookedLayer):
    module: nn.Embedding

    def per_example(
        self, grads: list[torch.Tensor], batch: int, limit: int
    ) -> list[tuple[torch.Tensor, _PerExample]]:
        (ids, _), (g,) = self.calls[0], grads
        if ids.shape[0] != batch:
            raise ValueError(f"Fast DP: {self.name!r} ids should be batch first.")
        g = g.reshape(batch, -1, g.shape[-1])
        pad = self.module.padding_idx
        if pad is not None:
            # nn.Embedding never updates its padding row; neither does its gradient here.
            g = g * (ids.reshape(batch, -1, 1) != pad).to(g.dtype)
        return [(self.module.weight, _EmbeddingRows(ids, g, self.module.num_embeddings))]


class _LayerNormLayer(_HookedLayer):
    module: nn.LayerNorm

    def per_example(
        self, grads: list[torch.Tensor], batch: int, limit: int
    ) -> list[tuple[torch.Tensor, _PerExample]]:
        (x, _), (g,) = self.calls[0], grads
        shape = tuple(self.module.normalized_shape)
        x_hat = F.layer_norm(x, shape, eps=self.module.eps)
        reduce = tuple(range(1, x.dim() - len(shape)))
        terms: list[tuple[torch.Tensor, _PerExample]] = []
        if self.module.weight is not None and self.module.weight.requires_grad:
            terms.append((self.module.weight, _Materialized((g * x_hat).sum(reduce))))
        if self.module.bias is not None and self.module.bias.requires_grad:
            terms.append((self.module.bias, _Materialized(g.sum(reduce))))
        return terms


class _Recurrence(torch.autograd.Function):
    """LSTM recurrence from gate pre-activations, all directions at once, with its own BPTT.

    ``z`` (B, T, D*4H) holds x_t W_ih^T + b_ih + b_hh for every step and direction (gate
    order i, f, g, o as in ``nn.LSTM``); direction 1 runs backwards in time. The
    backward pass returns dL/dz, the gradient of the pre-activations, which is all the
    per-example gradients of W_ih, W_hh and the biases are made of. W_hh is treated as a
    constant here: its gradient is formed by the clipper, per example.
    """

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, w_hh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, steps, _ = z.shape
        dirs, four_h, hidden = w_hh.shape
        zt = z.reshape(batch, steps, dirs, four_h).permute(1, 2, 0, 3).contiguous()
        if dirs == 2:
            zt[:, 1] = zt[:, 1].flip(0)  # direction 1 reads the sequence backwards
        w_t = w_hh.transpose(1, 2)  # (D, H, 4H)
        sig = torch.empty_like(zt)  # sigmoid of all gates (the g slot is unused)
        g = z.new_empty(steps, dirs, batch, hidden)  # tanh of the g gate
        c = z.new_empty(steps + 1, dirs, batch, hidden)  # c[t + 1] is the cell after step t
        tc = torch.empty_like(g)
        h = z.new_zeros(steps + 1, dirs, batch, hidden)
        c[0].zero_()
        for t in range(steps):
            gates = torch.baddbmm(zt[t], h[t], w_t)
            torch.sigmoid(gates, out=sig[t])
            torch.tanh(gates[..., 2 * hidden : 3 * hidden], out=g[t])
            s = sig[t]
            torch.addcmul(s[..., hidden : 2 * hidden] * c[t], s[..., :hidden], g[t], out=c[t + 1])
            torch.tanh(c[t + 1], out=tc[t])
            torch.mul(s[..., 3 * hidden :], tc[t], out=h[t + 1])
        ctx.save_for_backward(w_hh, sig, g, c, tc)
        out = h[1:]
        if dirs == 2:
            out = torch.stack([out[:, 0], out[:, 1].flip(0)], 1)
        c_n = c[-1].clone()  # each direction's last cell state, as nn.LSTM reports it
        ctx.mark_non_differentiable(c_n)
        return out.permute(2, 0, 1, 3).reshape(batch, steps, dirs * hidden), c_n

    @staticmethod
    def backward(
        ctx: Any, grad_out: torch.Tensor, grad_c_n: torch.Tensor | None
    ) -> tuple[torch.Tensor, None]:
        w_hh, sig, g, c, tc = ctx.saved_tensors
        steps, dirs, batch, hidden = g.shape
        dh_out = grad_out.reshape(batch, steps, dirs, hidden).permute(1, 2, 0, 3).contiguous()
        if dirs == 2:
            dh_out[:, 1] = dh_out[:, 1].flip(0)
        s_i, s_f = sig[..., :hidden], sig[..., hidden : 2 * hidden]
        s_o = sig[..., 3 * hidden :]
        dsig = sig * (1 - sig)
        # Step-independent factors, vectorized over time; the loop keeps only the chain.
        to_c = s_o * (1 - tc * tc)  # dh -> dc
        to_o = tc * dsig[..., 3 * hidden :]  # dh -> dz_o
        to_ifg = torch.cat(
            [g * dsig[..., :hidden], c[:-1] * dsig[..., hidden : 2 * hidden], s_i * (1 - g * g)],
            -1,
        ).view(steps, dirs, batch, 3, hidden)  # dc -> dz_i, dz_f, dz_g
        dz = torch.empty_like(sig)
        dz_ifg = dz[..., : 3 * hidden].unflatten(-1, (3, hidden))
        dh_next = torch.zeros_like(dh_out[0])
        dc = torch.zeros_like(dh_next)
        for t in range(steps - 1, -1, -1):
            dh = dh_out[t] + dh_next
            dc = torch.addcmul(dc, dh, to_c[t])
            torch.mul(dh, to_o[t], out=dz[t, ..., 3 * hidden :])
            torch.mul(dc.unsqueeze(2), to_ifg[t], out=dz_ifg[t])
            dh_next = torch.bmm(dz[t], w_hh)
            dc = dc * s_f[t]
        if dirs == 2:
            dz[:, 1] = dz[:, 1].flip(0)
        return dz.permute(2, 0, 1, 3).reshape(batch, steps, dirs * 4 * hidden), None


class FastDPLSTM(nn.Module):
    """Forward of an Opacus ``DPLSTM`` (one layer, batch first) on that module's own weights.

    The input projection of every direction is one matrix product over the whole
    sequence; the recurrence of all directions runs in one loop with a hand-written
    backward (``_Recurrence``) that hands back the gradient of the gate pre-activations,
    from which the per-example gradients of W_ih, W_hh and both biases are built. The
    ``DPLSTM`` is not a submodule: its parameters stay owned by the model.
    """

    def __init__(self, lstm: DPLSTM) -> None:
        super().__init__()
        if lstm.num_layers != 1 or not lstm.batch_first or lstm.proj_size:
            raise ValueError(
                "Fast DP supports a one-layer, batch-first DPLSTM without projection; "
                "use engine='opacus' for other LSTMs."
            )
        self.__dict__["source"] = lstm
        self.hidden = lstm.hidden_size
        self.directions = 2 if lstm.bidirectional else 1
        self.has_bias = bool(lstm.bias)
        params = dict(lstm.named_parameters())
        suffixes = ("", "_reverse")[: self.directions]
        self.w_ih = [params[f"weight_ih_l0{s}"] for s in suffixes]
        self.w_hh = [params[f"weight_hh_l0{s}"] for s in suffixes]
        self.b_ih = [params[f"bias_ih_l0{s}"] for s in suffixes] if self.has_bias else []
        self.b_hh = [params[f"bias_hh_l0{s}"] for s in suffixes] if self.has_bias else []
        self.layer: _LSTMLayer | None = None

    def parameters_in_order(self) -> list[nn.Parameter]:
        return [*self.w_ih, *self.w_hh, *self.b_ih, *self.b_hh]

    def forward(
        self, x: torch.Tensor, state_init: Any = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if state_init is not None or not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError("Fast DP's LSTM takes a padded (B, T, d) batch and a zero state.")
        weight = torch.cat(self.w_ih) if self.directions > 1 else self.w_ih[0]
        bias = (
            torch.cat([bi + bh for bi, bh in zip(self.b_ih, self.b_hh, strict=True)])
            if self.has_bias
            else None
        )
        pre = F.linear(x, weight, bias)  # (B, T, D*4H): one product for all steps
        w_hh = torch.stack([w.detach() for w in self.w_hh])
        out, c_n = _Recurrence.apply(pre, w_hh)
        if self.layer is not None:
            self.layer.record(x.detach(), out.detach(), pre)
        outs = out.unflatten(-1, (self.directions, self.hidden))
        # Final states as nn.LSTM returns them, (D, B, H); h_n is not differentiated here.
        h_n = torch.stack([outs[:, -1, 0], *([outs[:, 0, 1]] if self.directions == 2 else [])])
        return out, (h_n.detach(), c_n)


class _LSTMLayer(_Layer):
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
    ) -> list[tuple[torch.Tensor, _PerExample]]:
        (x, out, _), (d_pre,) = self.calls[0], grads
        gates, fused = 4 * self.fused.hidden, self.fused
        outs = out.unflatten(-1, (fused.directions, fused.hidden)).unbind(2)
        terms: list[tuple[torch.Tensor, _PerExample]] = []
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
                (fused.w_ih[d], _Outer(dz, x, limit)),
                (fused.w_hh[d], _Outer(dz, h_prev, limit)),
            ):
                if p.requires_grad:
                    terms.append((p, term))
            if fused.has_bias:
                bias_grad = _Materialized(dz.sum(1))
                for p in (fused.b_ih[d], fused.b_hh[d]):
                    if p.requires_grad:
                        terms.append((p, bias_grad))
        return terms


def _layers(model: nn.Module) -> list[_Layer]:
    """One handler per module that owns trainable parameters; the rest is refused."""
    layers: list[_Layer] = []
    lstm_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in lstm_prefixes):
            continue
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if isinstance(module, DPLSTM):
            if any(p.requires_grad for p in module.parameters()):
                layers.append(_LSTMLayer(name, module))
            lstm_prefixes.append(f"{name}.")
            continue
        if not own:
            continue
        if isinstance(module, nn.Embedding):
            if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
                raise ValueError(
                    f"Fast DP: embedding {name!r} uses max_norm, scale_grad_by_freq or "
                    "sparse gradients, which are not supported."
                )
            layers.append(_EmbeddingLayer(name, module, own))
        elif type(module) in (nn.Linear, nn.LayerNorm):
            handler = _LinearLayer if isinstance(module, nn.Linear) else _LayerNormLayer
            layers.append(handler(name, module, own))
        else:
            names = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            raise ValueError(
                f"Fast DP cannot compute per-example gradients of {type(module).__name__} "
                f"{name!r} (trainable {names}); supported: Linear, Embedding, LayerNorm, "
                "DPLSTM. Use engine='opacus'."
            )
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    covered = [id(p) for layer in layers for p in layer.params]
    if len(covered) != len(set(covered)) or set(covered) != trainable:
        raise ValueError(
            "Fast DP: trainable parameters are shared between modules or owned by "
            "unsupported modules; use engine='opacus'."
        )
    return layers


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
        self.layers = _layers(model)
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
            terms: list[tuple[torch.Tensor, _PerExample]] = []
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


def os_seeded_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded with 63 bits of OS entropy (``secrets``), never a fixed seed.

    Not a cryptographically secure generator (torch's CPU generator is a Mersenne
    Twister, its CUDA one Philox); docs/TRAINING.md says what that means.
    """
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


class FloatSafeEngine(PrivacyEngine):
    """Opacus's engine whose optimizers draw noise as in its secure mode, without torchcsprng.

    Opacus's ``secure_mode`` does two things: it takes randomness from torchcsprng (which
    has no build for current torch) and it draws each noise value as the sum of four
    Gaussians halved, its defence against floating-point attacks on the sampler. This
    engine keeps the second with a generator the caller seeds from OS entropy.
    """

    def _prepare_optimizer(self, **kwargs: Any) -> DPOptimizer:
        optimizer = super()._prepare_optimizer(**kwargs)
        optimizer.secure_mode = True
        return optimizer


def poisson_loader(
    data_loader: DataLoader[Any],
    *,
    sample_rate: float,
    steps: int,
    generator: torch.Generator,
) -> DPDataLoader:
    """Opacus's Poisson loader at exactly ``sample_rate`` with exactly ``steps`` batches per pass.

    ``DPDataLoader`` alone runs ``int(1 / sample_rate)`` batches, which floating point makes
    one fewer than planned for some sizes (1 / (1 / 93) = 92.99...); the sampler's own
    ``steps`` is set instead. ``generator`` (a CPU generator) draws the sampling: never
    torch's global one.
    """
    if not 0 < sample_rate <= 1 or steps < 1:
        raise ValueError("The sample rate should be in (0, 1] and steps a positive integer.")
    loader = DPDataLoader(
        data_loader.dataset,
        sample_rate=sample_rate,
        collate_fn=data_loader.collate_fn,
        generator=generator,
        distributed=False,
    )
    sampler = loader.batch_sampler
    assert isinstance(sampler, UniformWithReplacementSampler)
    sampler.steps = steps
    return loader


def make_private(
    engine: PrivacyEngine,
    *,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader[Any],
    noise_multiplier: float,
    max_grad_norm: float,
    noise_generator: torch.Generator | None = None,
    secure_noise: bool = False,
) -> tuple[DPOptimizer, DataLoader[Any]]:
    """Opacus's ``make_private`` minus the model wrapping (Opacus 1.6, privacy_engine.py).

    ``data_loader`` is either a ``DPDataLoader`` built by ``poisson_loader`` (what
    ``train_dp`` passes: sample rate and steps set exactly as planned) or a plain loader,
    which is turned into Poisson sampling at rate 1 / len(loader) with len(loader) steps
    and an OS-seeded sampler. Expected batch size int(n * q); Opacus's optimizer adds
    N(0, (sigma C)^2) to ``p.grad`` (the clipped sum; with ``secure_noise``, or in the
    engine's secure mode, drawn as Opacus's floating-point-safe sum of four) and divides
    by the expected batch size; the engine's accountant hook records every step at the
    loader's sample rate.
    """
    if noise_generator is not None and engine.secure_mode:
        raise ValueError("Passing seed is prohibited in secure mode")
    if isinstance(data_loader, DPDataLoader):
        dp_loader = data_loader
    else:
        dp_loader = poisson_loader(
            data_loader,
            sample_rate=1 / len(data_loader),
            steps=len(data_loader),
            generator=engine.secure_rng if engine.secure_mode else os_seeded_generator(),
        )
    sample_rate = dp_loader.sample_rate
    expected_batch_size = int(len(dp_loader.dataset) * sample_rate)  # type: ignore[arg-type]
    optim_class = get_optimizer_class(clipping="flat", distributed=False, grad_sample_mode="ghost")
    dp_optimizer = optim_class(
        optimizer=optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=engine.secure_rng if engine.secure_mode else noise_generator,
        secure_mode=engine.secure_mode or secure_noise or isinstance(engine, FloatSafeEngine),
    )
    dp_optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    return dp_optimizer, dp_loader
