"""DP-SGD plumbing shared by the training paths: Opacus's engine with the generators it
draws from, one step's gradient per engine, the event Opacus recorded, FedProx's pull."""

from __future__ import annotations

import importlib.util
import warnings

import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.nn import functional as F

from clients.fastdp.clipper import FastClipper
from clients.fastdp.engine import FloatSafeEngine
from clients.fastdp.poisson import os_seeded_generator
from privacy.params import DPParams


def secure_rng_available() -> bool:
    return importlib.util.find_spec("torchcsprng") is not None


def privacy_engine_for(
    secure_mode: bool, device: torch.device
) -> tuple[PrivacyEngine, torch.Generator | None, torch.Generator]:
    """Opacus's engine, the noise generator and the Poisson sampler's generator.

    With torchcsprng installed, secure mode is Opacus's own (its CSPRNG for both; the
    noise generator returned is None). torchcsprng has no build for current torch:
    without it, noise and sampling come from generators seeded with 63 bits of OS
    entropy per release (never a fixed seed, never torch's global generator), and in
    secure mode noise is still drawn the floating-point-safe way (``FloatSafeEngine``);
    a warning says the generators are not cryptographically strong.
    """
    if secure_mode and secure_rng_available():
        engine = PrivacyEngine(accountant="prv", secure_mode=True)
        return engine, None, engine.secure_rng
    noise, sampler = os_seeded_generator(device), os_seeded_generator("cpu")
    if secure_mode:
        warnings.warn(
            "secure_mode: torchcsprng is not installed; DP noise and Poisson sampling come "
            "from generators seeded from OS entropy; such a generator is not a CSPRNG "
            "(noise is still drawn floating-point-safe).",
            RuntimeWarning,
            stacklevel=3,
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        cls = FloatSafeEngine if secure_mode else PrivacyEngine
        return cls(accountant="prv", secure_mode=False), noise, sampler


class Step:
    """One DP-SGD step's gradient: sets ``p.grad`` as its engine's optimizer expects."""

    def __enter__(self) -> Step:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def backward(
        self, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor
    ) -> tuple[torch.Tensor, float]:
        raise NotImplementedError

    def empty(self) -> None:
        raise NotImplementedError


class OpacusStep(Step):
    """Opacus's hooks: per-example gradients in ``p.grad_sample``, clipped by the optimizer."""

    def __init__(self, dp_model: nn.Module, dp_optimizer: DPOptimizer) -> None:
        self.model, self.optimizer = dp_model, dp_optimizer

    def __exit__(self, *exc: object) -> None:
        remove_hooks = getattr(self.model, "remove_hooks", None)
        if callable(remove_hooks):
            remove_hooks()  # leave the caller's model a plain nn.Module

    def backward(
        self, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor
    ) -> tuple[torch.Tensor, float]:
        logits = self.model(*inputs)
        loss = F.cross_entropy(logits, labels)
        with warnings.catch_warnings():
            # The frozen embedding means no input needs a gradient; Opacus's hooks
            # still fire correctly, torch only notes it.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.backward()
        return logits.detach(), float(loss.detach())

    def empty(self) -> None:
        # No forward ran, so no hook set grad_sample; Opacus clips an empty batch to zero.
        for p in self.optimizer.params:
            p.grad_sample = p.new_zeros((0, *p.shape))


class FastStep(Step):
    def __init__(self, clipper: FastClipper, model: nn.Module) -> None:
        self.clipper, self.model = clipper, model

    def __enter__(self) -> Step:
        self.clipper.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.clipper.__exit__(*exc)

    def backward(
        self, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor
    ) -> tuple[torch.Tensor, float]:
        logits = self.model(*inputs)
        losses = F.cross_entropy(logits, labels, reduction="none")
        self.clipper.backward(losses)
        return logits.detach(), float(losses.detach().mean())

    def empty(self) -> None:
        self.clipper.zero_batch()


def proximal_pull(
    trainable: list[torch.nn.Parameter], anchor: list[torch.Tensor], step: float
) -> None:
    """FedProx's pull toward the round's global weights, after each DP step."""
    with torch.no_grad():
        for p, p0 in zip(trainable, anchor, strict=True):
            p.sub_(step * (p - p0))


def applied_params(privacy_engine: PrivacyEngine, clip_norm: float, delta: float) -> DPParams:
    """The one DP event Opacus recorded for this release, as the node reports it."""
    (noise, rate, taken), *rest = privacy_engine.accountant.history
    if rest:
        raise RuntimeError("Opacus recorded more than one DP event for one release.")
    return DPParams(float(noise), float(rate), int(taken), clip_norm, delta)
