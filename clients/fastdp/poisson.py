"""Poisson sampling: Opacus's loader at exactly the planned rate and number of steps."""

from __future__ import annotations

import secrets
from typing import Any

import torch
from opacus.data_loader import DPDataLoader
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader


def os_seeded_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded with 63 bits of OS entropy (``secrets``), never a fixed seed.

    Not a cryptographically secure generator (torch's CPU generator is a Mersenne
    Twister, its CUDA one Philox); docs/TRAINING.md says what that means.
    """
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


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
