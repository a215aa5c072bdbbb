"""The plan equals what Opacus's sampler runs, for every data size (issue 13, point 2)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from clients.fastdp.poisson import os_seeded_generator, poisson_loader
from clients.train import train_dp
from models import build_model
from privacy.params import DPParams, poisson_schedule
from tests.factories import tiny_spec, toy_data


@pytest.mark.parametrize("batch_size", [16, 64, 128])
def test_the_sampler_runs_the_planned_sample_rate_and_steps_for_every_size(
    batch_size: int,
) -> None:
    data = TensorDataset(torch.zeros(20_000, 1))
    gen = os_seeded_generator()
    off_by_one = []
    for n in range(1, 20_001):
        rate, steps = poisson_schedule(n, batch_size, 1)
        loader = DataLoader(torch.utils.data.Subset(data, range(n)), batch_size=batch_size)
        dp_loader = poisson_loader(loader, sample_rate=rate, steps=steps, generator=gen)
        assert dp_loader.sample_rate == rate and len(dp_loader) == steps, n
        if int(1 / rate) != steps:
            off_by_one.append(n)  # where deriving steps from q (Opacus's default) loses one
    # The sizes the review found (k = ceil(n/B) in 93, 99, ... makes int(1/(1/k)) = k - 1).
    if batch_size == 128:
        assert 11_777 in off_by_one and 11_904 in off_by_one
    assert off_by_one


def test_training_applies_exactly_the_plan_where_1_over_q_loses_a_step() -> None:
    """n = 93 at batch 1: 1 / (1 / 93) = 92.99..., so Opacus alone would run 92 steps."""
    spec, data = tiny_spec(), toy_data(93)
    rate, steps = poisson_schedule(93, 1, 1)
    assert int(1 / rate) == 92 and steps == 93
    dp = DPParams(1.0, rate, steps, 1.0, 1e-3)
    for engine in ("fast", "opacus"):
        result = train_dp(
            build_model(spec), data, spec, dp, batch_size=1, epochs=1, learning_rate=0.1,
            secure_mode=False, engine=engine,
        )  # fmt: skip
        assert result.applied == dp, engine


def test_sampling_does_not_draw_from_torchs_global_generator() -> None:
    """Two loaders under the same global seed sample differently: each has its own
    OS-seeded generator."""
    loader = DataLoader(TensorDataset(torch.zeros(1000, 1)), batch_size=100)
    batches = []
    for _ in range(2):
        torch.manual_seed(0)
        dp_loader = poisson_loader(
            loader, sample_rate=0.1, steps=3, generator=os_seeded_generator()
        )
        batches.append([b[0].shape[0] for b in dp_loader])
        assert dp_loader.generator is not None
    assert batches[0] != batches[1]
