from __future__ import annotations

import math

import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from privacy.accounting import compose_epsilon, create_accountant, noise_for_target
from privacy.budget import check_budget
from privacy.params import DPParams, poisson_schedule


def analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Exact epsilon of one Gaussian mechanism (sensitivity 1), Balle & Wang (2018)."""

    def delta_of(eps: float) -> float:
        return norm.cdf(-eps * sigma + 1 / (2 * sigma)) - math.exp(eps) * norm.cdf(
            -eps * sigma - 1 / (2 * sigma)
        )

    return float(brentq(lambda e: delta_of(e) - delta, 0.0, 100.0))


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_prv_matches_the_exact_gaussian_mechanism(sigma: float) -> None:
    exact = analytic_gaussian_epsilon(sigma, 1e-5)
    got = compose_epsilon([(sigma, 1.0, 1)], 1e-5, "prv")
    assert got == pytest.approx(exact, rel=0.02)
    # RDP is an upper bound on the same mechanism.
    assert compose_epsilon([(sigma, 1.0, 1)], 1e-5, "rdp") >= exact


def test_composition_of_rounds_equals_one_long_event() -> None:
    split = compose_epsilon([(1.1, 0.01, 100)] * 3, 1e-5)
    whole = compose_epsilon([(1.1, 0.01, 300)], 1e-5)
    assert split == pytest.approx(whole, rel=1e-6)
    assert compose_epsilon([], 1e-5) == 0.0


def test_noise_for_target_meets_the_target_tightly() -> None:
    sigma = noise_for_target(3.0, 1e-5, sample_rate=1 / 32, steps=96)
    eps = compose_epsilon([(sigma, 1 / 32, 96)], 1e-5)
    assert 2.9 <= eps <= 3.0


def test_unknown_accountant_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="Unknown accountant 'moments'"):
        create_accountant("moments")


def test_budget_refusal_names_budget_spent_and_requested() -> None:
    ev = DPParams(1.0, 0.05, 100, 1.0, 1e-5)
    spent = compose_epsilon([ev], 1e-5)
    decision = check_budget([ev], [ev], budget_epsilon=spent + 0.1, delta=1e-5)
    assert not decision.allowed
    assert f"spent {spent:.3f}" in decision.reason
    assert f"budget epsilon {spent + 0.1:.3f}" in decision.reason
    assert "requested" in decision.reason
    assert check_budget([], [ev], budget_epsilon=spent + 0.1, delta=1e-5).allowed


def test_dp_params_round_trip_and_validation() -> None:
    p = DPParams(1.25, 0.03125, 32, 1.0, 1e-5)
    assert DPParams.from_config(p.to_config()) == p
    assert p.matches(DPParams.from_config(p.to_config()))
    assert not p.matches(DPParams(1.2, 0.03125, 32, 1.0, 1e-5))
    with pytest.raises(ValueError, match="clipping norm should be a positive value"):
        DPParams(1.0, 0.1, 1, 0.0, 1e-5)
    with pytest.raises(ValueError, match="missing 'dp-steps'"):
        DPParams.from_config({k: v for k, v in p.to_config().items() if k != "dp-steps"})


def test_poisson_schedule_mirrors_opacus() -> None:
    assert poisson_schedule(2000, 64, 1) == (1 / 32, 32)
    assert poisson_schedule(100, 64, 3) == (1 / 2, 6)
