"""Which rule handles which module of a model; anything else trainable is refused."""

from __future__ import annotations

from opacus.layers import DPLSTM
from torch import nn

from clients.fastdp.rules.base import Rule
from clients.fastdp.rules.embedding import EmbeddingRule
from clients.fastdp.rules.layer_norm import LayerNormRule
from clients.fastdp.rules.linear import LinearRule
from clients.fastdp.rules.lstm import LSTMRule


def layer_rules(model: nn.Module) -> list[Rule]:
    """One handler per module that owns trainable parameters; the rest is refused."""
    layers: list[Rule] = []
    lstm_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in lstm_prefixes):
            continue
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if isinstance(module, DPLSTM):
            if any(p.requires_grad for p in module.parameters()):
                layers.append(LSTMRule(name, module))
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
            layers.append(EmbeddingRule(name, module, own))
        elif type(module) in (nn.Linear, nn.LayerNorm):
            handler = LinearRule if isinstance(module, nn.Linear) else LayerNormRule
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
