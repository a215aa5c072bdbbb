"""The rule interface, and the forward-hook rule most layer types share."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from clients.fastdp.per_example import PerExample


class Rule:
    """The rule for one trainable module: what its forward records, and its per-example
    gradient terms from that and the output gradient."""

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
    ) -> list[tuple[torch.Tensor, PerExample]]:
        raise NotImplementedError

    def attach(self, model: nn.Module) -> None:
        raise NotImplementedError

    def detach(self, model: nn.Module) -> None:
        raise NotImplementedError


class HookedRule(Rule):
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
