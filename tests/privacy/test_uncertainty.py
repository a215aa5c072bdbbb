"""Uncertainty of released metrics: known values, and coverage over seeded noise draws."""

from __future__ import annotations

import math
import random

import pytest

from privacy.evaluation import confusion_counts, metrics_from_counts
from privacy.uncertainty import (
    CONFIDENCE,
    accuracy_estimate,
    compare,
    count_estimate,
    macro_f1_estimate,
    released_uncertainty,
    wide_interval_warning,
    z_value,
)

# 600 test rows, 3 classes, accuracy 0.8 (row: true class).
MATRIX = [160.0, 20.0, 20.0, 20.0, 160.0, 20.0, 20.0, 20.0, 160.0]


def _matrix(n: int, k: int, accuracy: float, rng: random.Random) -> list[float]:
    """Exact counts of a model with about ``accuracy`` on ``n`` balanced rows."""
    truth = [t % k for t in range(n)]
    pred = [
        t if rng.random() < accuracy else rng.choice([c for c in range(k) if c != t]) for t in truth
    ]
    return confusion_counts(truth, pred, k)


def test_known_values() -> None:
    assert z_value() == pytest.approx(1.959964, abs=1e-6)
    # Examples: the sum of 9 noised counts, SD 3 * sigma.
    count = count_estimate(MATRIX, 3, 10.0)
    assert count.value == 600 and count.sd == 30.0
    assert count.low == pytest.approx(600 - 1.959964 * 30) and count.noise_sd == 30.0
    # Accuracy's noise SD by hand: sigma sqrt(k (1 - a)^2 + (k^2 - k) a^2) / n.
    acc = accuracy_estimate(MATRIX, 3, 10.0, sampling=False)
    assert acc.value == pytest.approx(0.8)
    assert acc.noise_sd == pytest.approx(10 * math.sqrt(3 * 0.04 + 6 * 0.64) / 600)
    # With sampling the binomial variance a (1 - a) / n is added.
    total = accuracy_estimate(MATRIX, 3, 10.0)
    assert total.sd == pytest.approx(math.sqrt(acc.noise_sd**2 + 0.8 * 0.2 / 600))
    assert total.low < 0.8 < total.high and total.width > acc.width
    # Without noise and sampling the interval is the point.
    exact = accuracy_estimate(MATRIX, 3, 1e-9, sampling=False)
    assert exact.low == pytest.approx(0.8, abs=1e-6) and exact.high == pytest.approx(0.8, abs=1e-6)
    # Macro-F1: each class's F1 is 2*160 / (200 + 200) = 0.8. Perturbing one count by h
    # moves macro-F1 by about grad * h: check the gradient numerically through the SD
    # of a single-count noise.
    f1 = macro_f1_estimate(MATRIX, 3, 10.0, sampling=False)
    assert f1.value == pytest.approx(0.8)
    grads = []
    for i in range(9):
        bumped = list(MATRIX)
        bumped[i] += 1e-4
        grads.append((metrics_from_counts(bumped, 3)["macro_f1"] - 0.8) / 1e-4)
    assert f1.noise_sd == pytest.approx(10 * math.sqrt(sum(g * g for g in grads)), rel=1e-3)
    flat = released_uncertainty(MATRIX, 3, 10.0)
    assert flat["accuracy"] == pytest.approx(0.8) and flat["examples_sd"] == 30.0
    assert flat["macro_f1_low"] < 0.8 < flat["macro_f1_high"]


def test_released_figures_are_unbiased_sums_not_clipped() -> None:
    # A noised count below 0 stays in the sums (clipping it inflated the total).
    counts = [10.0, -3.0, 2.0, 11.0]
    assert metrics_from_counts(counts, 2)["examples"] == 20.0
    assert metrics_from_counts(counts, 2)["accuracy"] == 1.0  # 21 / 20, clamped to its range
    assert metrics_from_counts([5.0, 5.0, 5.0, 5.0], 2)["accuracy"] == 0.5


@pytest.mark.parametrize(
    ("n", "k", "sigma", "accuracy"),
    [(600, 3, 10.0, 0.8), (100, 3, 10.0, 0.7), (45, 3, 10.0, 0.7), (300, 5, 5.0, 0.5)],
)
def test_interval_covers_the_exact_metric_at_its_stated_rate(
    n: int, k: int, sigma: float, accuracy: float
) -> None:
    """Over seeded noise draws on one test split, the noise-only interval covers the exact
    metric of that split at least 95% of the time (less three Monte Carlo SDs)."""
    rng = random.Random(n * 31 + k)
    exact_counts = _matrix(n, k, accuracy, rng)
    exact = metrics_from_counts(exact_counts, k)
    draws = 1500
    covered = {"examples": 0, "accuracy": 0, "macro_f1": 0}
    for _ in range(draws):
        noised = [c + rng.gauss(0.0, sigma) for c in exact_counts]
        est = {
            "examples": count_estimate(noised, k, sigma),
            "accuracy": accuracy_estimate(noised, k, sigma, sampling=False),
            "macro_f1": macro_f1_estimate(noised, k, sigma, sampling=False),
        }
        for name, e in est.items():
            covered[name] += e.low <= exact[name] <= e.high
    slack = 3 * math.sqrt(CONFIDENCE * (1 - CONFIDENCE) / draws)
    for name, hits in covered.items():
        assert hits / draws >= CONFIDENCE - slack, (name, hits / draws)
    # The intervals are not trivially [0, 1] where the split is large enough.
    if n >= 600:
        assert accuracy_estimate(exact_counts, k, sigma).width < 0.2


def test_interval_with_sampling_covers_the_models_population_metric() -> None:
    """Test rows drawn from a population, then noised: the reported interval (noise and
    sampling) covers the population's accuracy and macro-F1 at the stated rate."""
    rng = random.Random(11)
    k, n, sigma = 3, 300, 10.0
    p = [(0.75 if t == c else 0.125) / k for t in range(k) for c in range(k)]
    truth = metrics_from_counts(p, k)
    draws, covered_acc, covered_f1 = 1500, 0, 0
    for _ in range(draws):
        counts = [0.0] * (k * k)
        for cell in rng.choices(range(k * k), weights=p, k=n):
            counts[cell] += 1
        noised = [c + rng.gauss(0.0, sigma) for c in counts]
        acc, f1 = accuracy_estimate(noised, k, sigma), macro_f1_estimate(noised, k, sigma)
        covered_acc += acc.low <= truth["accuracy"] <= acc.high
        covered_f1 += f1.low <= truth["macro_f1"] <= f1.high
    slack = 3 * math.sqrt(CONFIDENCE * (1 - CONFIDENCE) / draws)
    assert covered_acc / draws >= CONFIDENCE - slack
    assert covered_f1 / draws >= CONFIDENCE - slack


def test_small_split_interval_is_wide_and_warned() -> None:
    # The case: 45 released test rows with noise SD 10.
    rng = random.Random(3)
    counts = [c + rng.gauss(0, 10.0) for c in _matrix(45, 3, 0.7, rng)]
    flat = released_uncertainty(counts, 3, 10.0)
    assert flat["accuracy_sd"] > 0.2 and flat["accuracy_high"] - flat["accuracy_low"] > 0.5
    warning = wide_interval_warning(flat, eval_noise=10.0, examples=flat["examples"])
    assert warning is not None
    assert "more test data" in warning and "--eval-noise, now 10" in warning
    # A large split at the same noise: no warning.
    big = released_uncertainty(MATRIX, 3, 10.0)
    assert wide_interval_warning(big, eval_noise=10.0, examples=600) is None
    assert wide_interval_warning({}, eval_noise=10.0) is None


def test_compare_is_one_sided_at_its_error_rate() -> None:
    assert compare(0.80, 0.01, 0.70, 0.01).better
    assert not compare(0.71, 0.05, 0.70, 0.05).better
    assert not compare(0.60, 0.01, 0.70, 0.01).better
    c = compare(0.7 + 1.6449 * math.sqrt(2) * 0.02 + 1e-3, 0.02, 0.7, 0.02)
    assert c.better and c.error_rate == 0.05 and "significantly better" in c.describe()
    with pytest.raises(ValueError, match="error rate"):
        compare(0.8, 0.1, 0.7, 0.1, error_rate=0.7)


def test_a_rare_class_bounds_its_share_and_the_interval_still_covers() -> None:
    """600 rows of which 2% are one class: that class's F1 is unknowable under noise SD
    10, so its share of the interval is about its range (1/3), not the whole [0, 1];
    the interval still covers the exact macro-F1 at the stated rate."""
    rng = random.Random(8)
    truth = rng.choices(range(3), weights=(0.49, 0.49, 0.02), k=600)
    pred = [t if rng.random() < 0.6 else rng.choice([c for c in range(3) if c != t]) for t in truth]
    exact_counts = confusion_counts(truth, pred, 3)
    exact = metrics_from_counts(exact_counts, 3)["macro_f1"]
    draws, covered, widths = 1500, 0, []
    for _ in range(draws):
        est = macro_f1_estimate(
            [c + rng.gauss(0.0, 10.0) for c in exact_counts], 3, 10.0, sampling=False
        )
        covered += est.low <= exact <= est.high
        widths.append(est.width)
    slack = 3 * math.sqrt(CONFIDENCE * (1 - CONFIDENCE) / draws)
    assert covered / draws >= CONFIDENCE - slack
    assert sorted(widths)[draws // 2] < 0.5  # not the whole range
