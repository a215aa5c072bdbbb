"""Opacus's privacy engine around the fast clipper: its noise, its accountant hook."""

from __future__ import annotations

from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer, get_optimizer_class
from torch.utils.data import DataLoader

from clients.fastdp.poisson import os_seeded_generator, poisson_loader


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
