"""Evaluation metrics released under DP: Gaussian noise on a confusion matrix.

A tenant's held-out split is private data too. What leaves a node about it is one
confusion matrix per evaluated model (rows: true class, columns: predicted class) with
independent Gaussian noise N(0, sigma^2) on every count. Adding or removing one example
changes exactly one count by 1, so the L2 sensitivity of one matrix is 1 and its release
is the Gaussian mechanism: a ``DPParams`` with sample rate 1, one step per matrix and
clipping norm 1, composed into the ledger like any other release. Accuracy and
macro-F1 are computed from the noised counts (post-processing, no further cost).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

# Standard deviation of the noise on each released count, unless a run sets eval-noise:
# an SD of about 0.04 on the accuracy of a 500-example, 3-class split at accuracy 0.8
# (about 0.4 on a 45-example one: privacy.uncertainty); about +0.06 epsilon on top of a
# run targeting 3 (global and personalized matrices; docs/AUDIT.md).
DEFAULT_EVAL_NOISE = 10.0
_SYSTEM = random.SystemRandom()  # os.urandom: a CSPRNG, never a seedable generator


def confusion_counts(y_true: Sequence[int], y_pred: Sequence[int], classes: int) -> list[float]:
    """Row-major ``classes x classes`` counts: cell (t, p) counts true t predicted p."""
    counts = [0.0] * (classes * classes)
    for t, p in zip(y_true, y_pred, strict=True):
        counts[int(t) * classes + int(p)] += 1.0
    return counts


def gaussian_noise(sigma: float, size: int, *, secure: bool = True) -> list[float]:
    """``size`` draws of N(0, sigma^2) from the OS's CSPRNG.

    In ``secure`` mode each draw is (x1 + x2 + x3 + x4) / 2 of four N(0, sigma^2) draws,
    Opacus's defence against floating-point attacks on the Gaussian sampler (Holohan
    and Braghin 2021, n = 2), which keeps the variance sigma^2.
    """
    if not sigma > 0:
        raise ValueError("The evaluation noise should be a positive value.")
    if secure:
        return [sum(_SYSTEM.gauss(0.0, sigma) for _ in range(4)) / 2 for _ in range(size)]
    return [_SYSTEM.gauss(0.0, sigma) for _ in range(size)]


def noised(counts: Sequence[float], sigma: float, *, secure: bool = True) -> list[float]:
    """The counts with independent Gaussian noise of standard deviation ``sigma`` each."""
    return [
        c + n
        for c, n in zip(counts, gaussian_noise(sigma, len(counts), secure=secure), strict=True)
    ]


def metrics_from_counts(counts: Sequence[float], classes: int) -> dict[str, float]:
    """Examples, accuracy and macro-F1 from (possibly noised) confusion counts.

    Noised counts are used as released, negative ones included: their sums are then
    unbiased (clipping each count at 0 added about 0.4 sigma per empty cell, inflating
    the released test size and deflating accuracy on small splits). The figures are
    clamped to their ranges instead. Macro-F1 averages over classes that appear in truth
    or prediction, as the exact metric does. Their uncertainty: ``privacy.uncertainty``.
    """
    if len(counts) != classes * classes:
        raise ValueError(f"Expected {classes * classes} counts, got {len(counts)}.")
    m = [[float(counts[t * classes + p]) for p in range(classes)] for t in range(classes)]
    total = sum(map(sum, m))
    correct = sum(m[c][c] for c in range(classes))
    scores = []
    for c in range(classes):
        tp = m[c][c]
        fp = sum(m[t][c] for t in range(classes)) - tp
        fn = sum(m[c]) - tp
        if 2 * tp + fp + fn > 0:
            scores.append(min(1.0, max(0.0, 2 * tp / (2 * tp + fp + fn))))
    return {
        "examples": max(0.0, total),
        "accuracy": min(1.0, max(0.0, correct / total)) if total > 0 else 0.0,
        "macro_f1": sum(scores) / len(scores) if scores else 0.0,
    }
