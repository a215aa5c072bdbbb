"""The LSTM forward that the LSTM rule swaps in for Opacus's ``DPLSTM``: one input
projection for all steps and a recurrence with its own backward."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from opacus.layers import DPLSTM
from torch import nn
from torch.nn import functional as F


class Recorder(Protocol):
    """What records a forward pass for per-example gradients (the LSTM rule, when attached)."""

    def record(self, *tensors: torch.Tensor) -> None: ...


class Recurrence(torch.autograd.Function):
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
    backward (``Recurrence``) that hands back the gradient of the gate pre-activations,
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
        self.layer: Recorder | None = None  # the rule recording this forward, while attached

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
        out, c_n = Recurrence.apply(pre, w_hh)
        if self.layer is not None:
            self.layer.record(x.detach(), out.detach(), pre)
        outs = out.unflatten(-1, (self.directions, self.hidden))
        # Final states as nn.LSTM returns them, (D, B, H); h_n is not differentiated here.
        h_n = torch.stack([outs[:, -1, 0], *([outs[:, 0, 1]] if self.directions == 2 else [])])
        return out, (h_n.detach(), c_n)
