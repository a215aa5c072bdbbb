"""Inference-only rewrites of a loaded model: same math, faster kernels, optional int8."""

from __future__ import annotations

import warnings

import torch
from opacus.layers import DPLSTM
from torch import nn

# Admin choices per model version (ModelVersion.quantize); None serves float32.
QUANTIZE_MODES = ("dynamic-int8",)


def check_quantize(mode: str | None) -> str | None:
    """Return ``mode`` if it is a known quantization mode (or None), else raise ValueError."""
    if mode is not None and mode not in QUANTIZE_MODES:
        raise ValueError(f"Unknown quantization {mode!r}; known: {list(QUANTIZE_MODES)} or null.")
    return mode


def _fused_lstm(dp: DPLSTM) -> nn.LSTM:
    """An ``nn.LSTM`` with DPLSTM's weights.

    Opacus's DPLSTM runs one Python step per token (it needs per-example gradients); at
    inference the fused kernel computes the same gates (i, f, g, o) about 8x faster.
    """
    lstm = nn.LSTM(
        dp.input_size,
        dp.hidden_size,
        num_layers=dp.num_layers,
        bias=dp.bias,
        batch_first=dp.batch_first,
        dropout=dp.dropout,
        bidirectional=dp.bidirectional,
    )
    # DPLSTM names its parameters like nn.LSTM (weight_ih_l0, ..._reverse).
    lstm.load_state_dict({k: v.detach() for k, v in dp.named_parameters()}, strict=True)
    return lstm.eval()


def prepare_for_inference(model: nn.Module, quantize: str | None = None) -> nn.Module:
    """Swap training-only layers for fused ones and optionally quantize; returns eval mode."""
    check_quantize(quantize)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, DPLSTM):
                setattr(parent, child_name, _fused_lstm(child))
    model.eval().requires_grad_(False)
    if quantize == "dynamic-int8":
        with warnings.catch_warnings():
            # torch.ao still ships dynamic quantization but warns about its future move.
            warnings.simplefilter("ignore")
            model = torch.ao.quantization.quantize_dynamic(
                model, {nn.LSTM, nn.Linear}, dtype=torch.qint8
            )
    return model


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the model's own float weights, each storage once.

    A shared, public frozen table is a non-persistent buffer and is not counted. Call it
    before quantizing: packed int8 weights are opaque, so the float size is the bound used.
    """
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in model.state_dict().values() if isinstance(t, torch.Tensor)}  # fmt: skip
    return sum(storages.values())
