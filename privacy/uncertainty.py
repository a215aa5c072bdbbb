"""How far a released metric can be from the truth: uncertainty from the known DP noise.

A tenant's evaluation leaves its node as a confusion matrix with independent Gaussian
noise of known standard deviation ``sigma`` on every count (``privacy.evaluation``).
Everything here is post-processing of those released counts (no privacy cost).

Two sources of error are stated, each with the population it speaks about:

- **noise**: the released figure against the *exact* figure on the tenant's test split
  (what the same split would give without DP noise). Known exactly: the noise is Gaussian
  with the run's ``eval-noise`` as standard deviation.
- **sampling**: the exact figure on a finite test split against the model's figure on
  data like it (the test rows taken as independent draws from the tenant's data, a
  multinomial over the confusion cells). Estimated from the released counts.

The interval reported with every metric covers both (``low``/``high``), at 95%:

- accuracy: Fieller's interval for a ratio of Gaussians, inverted exactly: the set of
  accuracies ``a`` with ``(D - a T)^2 <= z^2 Var(D - a T)`` (``D`` the released diagonal,
  ``T`` the released total). Under the noise alone it is exact; with sampling it is
  the Wilson score interval's form, extended by the noise.
- macro-F1: the delta method (first-order variance through the gradient of macro-F1 in
  every count), a symmetric interval clamped to [0, 1]; approximate, and most
  trustworthy where the warning below is silent.
- released example count: the sum of ``k^2`` noised counts, standard deviation ``k sigma``
  (exact).

Pure functions on lists of floats, tested with known values and seeded simulations
(tests/privacy/test_uncertainty.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from statistics import NormalDist

CONFIDENCE = 0.95
# An interval wider than this (high - low, i.e. about +-0.15) says little about a model:
# models whose scores differ by less cannot be told apart, so the figure carries a
# warning. (600 balanced test rows of 3 classes at the default eval-noise give 0.13-0.2.)
WIDE_INTERVAL = 0.3
# The error rate of every automatic decision taken on released metrics (one-sided):
# between two models of equal exact score, the newer is chosen at most this often.
DECISION_ERROR_RATE = 0.05


def z_value(confidence: float = CONFIDENCE) -> float:
    """The two-sided standard normal quantile: 1.96 for 95%."""
    if not 0 < confidence < 1:
        raise ValueError("The confidence should be between 0 and 1.")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


@dataclass(frozen=True)
class Estimate:
    """A released figure with its uncertainty.

    ``sd`` and ``low``/``high`` cover noise and, where asked, sampling; ``noise_sd`` is the
    DP noise's share alone.
    """

    value: float
    sd: float
    noise_sd: float
    low: float
    high: float

    @property
    def width(self) -> float:
        return self.high - self.low


def _matrix(counts: Sequence[float], classes: int) -> list[float]:
    if classes < 1 or len(counts) != classes * classes:
        raise ValueError(f"Expected {classes * classes} counts, got {len(counts)}.")
    return [float(c) for c in counts]


def count_estimate(
    counts: Sequence[float], classes: int, sigma: float, *, confidence: float = CONFIDENCE
) -> Estimate:
    """The released number of test examples: the sum of the noised counts, SD ``k sigma``."""
    m = _matrix(counts, classes)
    total = sum(m)
    sd = classes * sigma
    z = z_value(confidence)
    return Estimate(max(0.0, total), sd, sd, max(0.0, total - z * sd), max(0.0, total + z * sd))


def accuracy_estimate(
    counts: Sequence[float],
    classes: int,
    sigma: float,
    *,
    sampling: bool = True,
    confidence: float = CONFIDENCE,
) -> Estimate:
    """Released accuracy ``D / T`` with its SD (delta method) and Fieller's interval.

    Noise: ``D - a T`` has ``k`` diagonal counts with weight ``1 - a`` and ``k^2 - k``
    off-diagonal ones with weight ``-a``, so its noise variance is
    ``sigma^2 (k (1 - a)^2 + (k^2 - k) a^2)``. Sampling adds ``n a (1 - a)`` (binomial).
    """
    m = _matrix(counts, classes)
    k = classes
    total = sum(m)
    diag = sum(m[c * k + c] for c in range(k))
    value = min(1.0, max(0.0, diag / total)) if total > 0 else 0.0
    n = max(total, 1.0)
    z = z_value(confidence)
    s2 = sigma * sigma

    def noise_var(a: float) -> float:
        return s2 * (k * (1 - a) ** 2 + (k * k - k) * a * a) / (n * n)

    noise_sd = math.sqrt(noise_var(value))
    sd = math.sqrt(noise_var(value) + (value * (1 - value) / n if sampling else 0.0))
    # q(a) = (D - a T)^2 - z^2 [sigma^2 (k (1-a)^2 + (k^2-k) a^2) + n a (1 - a)] <= 0
    w = n if sampling else 0.0
    qa = total * total - z * z * s2 * k * k + z * z * w
    qb = -2 * diag * total + 2 * z * z * s2 * k - z * z * w
    qc = diag * diag - z * z * s2 * k
    low, high = _quadratic_set_hull(qa, qb, qc)
    if low is None or high is None:  # no accuracy is consistent at this level
        low, high = value - z * sd, value + z * sd
    return Estimate(value, sd, noise_sd, max(0.0, min(low, value)), min(1.0, max(high, value)))


def _quadratic_set_hull(a: float, b: float, c: float) -> tuple[float | None, float | None]:
    """The smallest interval holding ``{x in [0, 1]: a x^2 + b x + c <= 0}``."""

    def q(x: float) -> float:
        return (a * x + b) * x + c

    points = [0.0, 1.0]
    if abs(a) > 1e-12:
        disc = b * b - 4 * a * c
        if disc >= 0:
            r = math.sqrt(disc)
            points += [x for x in ((-b - r) / (2 * a), (-b + r) / (2 * a)) if 0 < x < 1]
    elif abs(b) > 1e-12 and 0 < -c / b < 1:
        points.append(-c / b)
    points.sort()
    inside = [x for x in points if q(x) <= 1e-9 * max(1.0, abs(c))]
    # Between two consecutive points q keeps its sign: test the middles too.
    inside += [(x + y) / 2 for x, y in pairwise(points) if q((x + y) / 2) <= 0]
    if not inside:
        return None, None
    return min(inside), max(inside)


def _f1_parts(m: list[float], k: int) -> tuple[float, list[list[float]]]:
    """Macro-F1 of the counts and, per class present, the gradient of its share
    (F1_c / classes present) in every count (row-major)."""
    rows = [sum(m[c * k + j] for j in range(k)) for c in range(k)]
    cols = [sum(m[i * k + c] for i in range(k)) for c in range(k)]
    present = [c for c in range(k) if rows[c] + cols[c] > 0]
    if not present:
        return 0.0, []
    scores, grads = [], []
    for c in present:
        s, tp = rows[c] + cols[c], m[c * k + c]
        scores.append(min(1.0, max(0.0, 2 * tp / s)))
        # d(2 tp / s) / d m_ij = (2 [i=j=c] s - 2 tp ([i=c] + [j=c])) / s^2
        grad = [0.0] * (k * k)
        for i in range(k):
            for j in range(k):
                d = (2 * s if i == c and j == c else 0.0) - 2 * tp * ((i == c) + (j == c))
                grad[i * k + j] = d / (s * s) / len(present)
        grads.append(grad)
    return sum(scores) / len(scores), grads


def _variance(grad: Sequence[float], sigma: float, clipped: Sequence[float] | None) -> float:
    """Noise variance ``sigma^2 |grad|^2`` plus, with ``clipped`` counts, the
    multinomial sampling variance ``sum g^2 m - (sum g m)^2 / n``."""
    var = sigma * sigma * sum(g * g for g in grad)
    if clipped is not None:
        n = max(sum(clipped), 1.0)
        first = sum(g * x for g, x in zip(grad, clipped, strict=True))
        var += max(0.0, sum(g * g * x for g, x in zip(grad, clipped, strict=True)) - first**2 / n)
    return var


def macro_f1_estimate(
    counts: Sequence[float],
    classes: int,
    sigma: float,
    *,
    sampling: bool = True,
    confidence: float = CONFIDENCE,
) -> Estimate:
    """Released macro-F1 with its delta-method SD and a symmetric interval in [0, 1].

    Noise variance ``sigma^2 |grad|^2``; sampling (multinomial over the cells, ``n``
    rows) ``sum g^2 m - (sum g m)^2 / n`` with the counts clipped at 0. A class whose
    counts are too few for its noise (its F1's first-order SD above 0.5, which no figure
    in [0, 1] can exceed) has its gradient scaled down to that SD: its share of the
    interval is then about its whole range, 1/classes, instead of an unbounded one.
    """
    m = _matrix(counts, classes)
    value, grads = _f1_parts(m, classes)
    clipped = [max(0.0, x) for x in m] if sampling else None
    share_cap = 0.5 / max(len(grads), 1)  # SD 0.5 of F1_c, in its 1/present share
    total = [0.0] * len(m)
    for grad in grads:
        sd_c = math.sqrt(_variance(grad, sigma, clipped))
        scale = share_cap / sd_c if sd_c > share_cap else 1.0
        total = [t + g * scale for t, g in zip(total, grad, strict=True)]
    noise_sd = math.sqrt(_variance(total, sigma, None))
    sd, z = math.sqrt(_variance(total, sigma, clipped)), z_value(confidence)
    return Estimate(value, sd, noise_sd, max(0.0, value - z * sd), min(1.0, value + z * sd))


def released_uncertainty(
    counts: Sequence[float], classes: int, sigma: float, *, confidence: float = CONFIDENCE
) -> dict[str, float]:
    """Every released figure of one confusion matrix with its uncertainty, flat.

    Keys: ``examples``, ``accuracy``, ``macro_f1`` (the released values) and, for each,
    ``<name>_sd`` (noise and sampling; for ``examples`` the noise alone),
    ``<name>_noise_sd``, ``<name>_low`` and ``<name>_high`` (the ``confidence`` interval).
    """
    out: dict[str, float] = {}
    for name, est in (
        ("examples", count_estimate(counts, classes, sigma, confidence=confidence)),
        ("accuracy", accuracy_estimate(counts, classes, sigma, confidence=confidence)),
        ("macro_f1", macro_f1_estimate(counts, classes, sigma, confidence=confidence)),
    ):
        out[name] = est.value
        out[f"{name}_sd"] = est.sd
        out[f"{name}_noise_sd"] = est.noise_sd
        out[f"{name}_low"] = est.low
        out[f"{name}_high"] = est.high
    return out


@dataclass(frozen=True)
class Comparison:
    """Is ``new`` better than ``old``, beyond what their noise explains?"""

    better: bool
    difference: float
    sd: float
    z: float
    error_rate: float

    def describe(self, metric: str = "macro-F1") -> str:
        verdict = "significantly better" if self.better else "not significantly better"
        return (
            f"{metric} difference {self.difference:+.3f} (SD {self.sd:.3f}, z {self.z:.2f}): "
            f"{verdict} at a {self.error_rate:.0%} error rate"
        )


def compare(
    new: float,
    new_sd: float,
    old: float,
    old_sd: float,
    *,
    error_rate: float = DECISION_ERROR_RATE,
) -> Comparison:
    """One-sided z-test of ``new > old`` for two independently released figures.

    Between two models of equal exact score, ``better`` is true with probability at most
    ``error_rate`` (as far as the SDs are right; both SDs must include every source of
    error that differs between the two figures).
    """
    if not 0 < error_rate < 0.5:
        raise ValueError("The decision error rate should be between 0 and 0.5.")
    diff = new - old
    sd = math.sqrt(max(new_sd, 0.0) ** 2 + max(old_sd, 0.0) ** 2)
    z = diff / sd if sd > 0 else (math.inf if diff > 0 else -math.inf if diff < 0 else 0.0)
    threshold = NormalDist().inv_cdf(1 - error_rate)
    return Comparison(z > threshold, diff, sd, z, error_rate)


WIDE_ADVICE = (
    "Use more test data (--max-test-examples, or more rows per tenant), or a lower "
    "--eval-noise{now} (a larger share of epsilon spent on the evaluation)."
)


def wide_interval(
    metrics: Mapping[str, object], *, limit: float = WIDE_INTERVAL
) -> tuple[str, float] | None:
    """The released metric whose 95% interval is widest, and its width, when wider than
    ``limit`` (too wide to tell models apart); None otherwise."""
    widths = []
    for name in ("accuracy", "macro_f1"):
        low, high = metrics.get(f"{name}_low"), metrics.get(f"{name}_high")
        if isinstance(low, int | float) and isinstance(high, int | float):
            widths.append((float(high) - float(low), name.replace("macro_f1", "macro-F1")))
    if not widths:
        return None
    width, name = max(widths)
    return (name, width) if width > limit else None


def wide_interval_warning(
    metrics: Mapping[str, object],
    *,
    eval_noise: float | None,
    examples: float | None = None,
    limit: float = WIDE_INTERVAL,
) -> str | None:
    """What to do when a released metric's interval is too wide to mean anything.

    ``metrics`` holds ``accuracy_low``/``_high`` and ``macro_f1_low``/``_high`` (missing or
    None: nothing to warn about). The advice names the settings that shrink the interval:
    more test rows (``max-test-examples``, or a larger test share of the data) and a
    smaller ``eval-noise`` (a larger share of epsilon spent on the evaluation).
    """
    wide = wide_interval(metrics, limit=limit)
    if wide is None:
        return None
    name, width = wide
    rows = f" ({examples:.0f} released test rows)" if examples is not None else ""
    return (
        f"The 95% interval of {name} is {width:.2f} wide{rows}: too wide to tell models "
        "apart. " + WIDE_ADVICE.format(now=f", now {eval_noise:g}" if eval_noise else "")
    )
