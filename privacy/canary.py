"""Canaries and an empirical lower bound on epsilon from one training run.

Method: Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run"
(NeurIPS 2023). ``m`` canaries are each included in the training data independently
with probability 1/2; after training, an auditor scores every canary (here: minus
its loss under the released model), guesses "member" for the ``k`` highest scores
and "non-member" for the ``k`` lowest, and abstains on the rest. If the training
is (epsilon, delta)-DP, the number of correct guesses among the ``r = 2k`` is
stochastically dominated by Binomial(r, e^eps / (1 + e^eps)) up to a delta term
(their Theorem 3.1 / Proposition 5.2). The largest epsilon rejected at confidence
1 - p is a lower bound that holds with probability 1 - p.

Why not thresholds with Clopper-Pearson on FPR/FNR (Jagielski et al. 2020, Nasr et
al. 2021)? Those bounds assume independent trials, i.e. one model trained per
guess; with many canaries in one run the trials are not independent and the
interval is not valid. The one-run analysis above is.

Canary texts and their membership are a pure function of a seed, so the client
that inserts them and the auditor who scores them agree without any text crossing
the federation boundary.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import binom

# A fixed, public word list: canaries are random sentences over it, unlikely in real data.
_WORDS = (
    "amber", "basalt", "cobalt", "dune", "ember", "fjord", "garnet", "heron", "indigo",
    "juniper", "krill", "lichen", "magma", "nebula", "onyx", "quartz", "raven", "saffron",
    "tundra", "umber", "violet", "walrus", "xenon", "yarrow", "zephyr", "anvil", "bramble",
    "cinder", "drizzle", "falcon", "glacier", "hazel", "ivory", "jasper", "kelp", "lantern",
    "meadow", "nickel", "orchid", "pebble", "quill", "ripple", "sorrel", "thistle", "urchin",
    "vapor", "willow", "yonder", "zinc", "acorn", "beacon", "comet", "delta", "fennel",
)  # fmt: skip


@dataclass(frozen=True)
class Canary:
    text: str
    label: int
    member: bool  # inserted into the training data


def make_canaries(seed: int, count: int, num_labels: int) -> list[Canary]:
    """``count`` canaries, each a member with probability 1/2, all derived from ``seed``.

    Parameters
    ----------
    seed
        Pick it at random for each audit (the secrecy of membership rests on it).
    count
        Number of canaries ``m``.
    num_labels
        Labels are drawn uniformly from ``range(num_labels)``.
    """
    if count < 1:
        raise ValueError("The number of canaries should be a positive integer.")
    if num_labels < 2:
        raise ValueError("Canaries need at least two labels.")
    rng = random.Random(f"fedtext-canary:{seed}")
    canaries = []
    for i in range(count):
        words = " ".join(rng.choice(_WORDS) for _ in range(7))
        text = f"{words} {rng.randrange(10**6):06d} {i}"
        canaries.append(Canary(text, rng.randrange(num_labels), rng.random() < 0.5))
    return canaries


def canary_rows(canary: Canary, rows: int) -> list[str]:
    """A canary user's ``rows`` texts: the canary's sentence, numbered (privacy-unit user:
    one canary is one person who wrote several rows, all with the canary's label)."""
    if rows < 1:
        raise ValueError("A canary user writes at least one row.")
    return [canary.text] if rows == 1 else [f"{canary.text} r{j}" for j in range(rows)]


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability of ``v`` or more correct guesses out of ``r`` under (epsilon, delta)-DP.

    Steinke, Nasr and Jagielski (2023), Algorithm in their appendix: the binomial tail
    at ``q = e^eps / (1 + e^eps)`` plus the delta term ``2 m delta`` times the
    largest average of binomial masses below ``v``.
    """
    if not 0 <= v <= r <= m:
        raise ValueError("Need 0 <= correct <= guesses <= canaries.")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError("Need epsilon >= 0 and delta in [0, 1].")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if v == 0:
        return min(1.0, beta)
    # alpha = max over i in 1..v of P[v - i <= Binomial(r, q) < v] / i
    i = np.arange(1, v + 1)
    alpha = float(np.max(np.cumsum(binom.pmf(v - i, r, q)) / i))
    return min(1.0, beta + alpha * delta * 2 * m)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon that ``v`` correct of ``r`` guesses rejects at ``confidence``.

    Returns 0.0 when even epsilon = 0 cannot be rejected.
    """
    if not 0 < confidence < 1:
        raise ValueError("The confidence should be in (0, 1).")
    p = 1 - confidence
    if p_value(m, r, v, 0.0, delta) >= p:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < p:
        lo, hi = hi, hi * 2
        if hi > 1e3:
            return lo  # astronomically strong evidence; cap the search
    for _ in range(50):
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < p:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class AuditOutcome:
    canaries: int
    members: int
    guesses: int
    correct: int
    confidence: float
    delta: float
    epsilon_lower_bound: float


def audit_scores(
    scores: Sequence[float],
    members: Sequence[bool],
    *,
    delta: float,
    guesses: int | None = None,
    confidence: float = 0.95,
) -> AuditOutcome:
    """Guess on the extremes of ``scores`` (higher = more member-like) and bound epsilon.

    ``guesses`` (even, default half the canaries) must be fixed before looking at the
    scores: choosing it after would invalidate the confidence level.
    """
    m = len(scores)
    if m != len(members) or m == 0:
        raise ValueError("scores and members should be non-empty and of the same length.")
    r = guesses if guesses is not None else max(2, m // 2)
    r = min(r - r % 2, m - m % 2)
    if r < 2:
        raise ValueError("At least two guesses (one each way) are needed.")
    order = sorted(range(m), key=lambda i: scores[i])
    k = r // 2
    correct = sum(1 for i in order[-k:] if members[i]) + sum(1 for i in order[:k] if not members[i])
    return AuditOutcome(
        canaries=m,
        members=sum(members),
        guesses=r,
        correct=correct,
        confidence=confidence,
        delta=delta,
        epsilon_lower_bound=epsilon_lower_bound(m, r, correct, delta, confidence),
    )
