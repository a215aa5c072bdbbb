"""PRV discretisation failures fall back to the RDP bound (found by bench/soak.py).

A run request at epsilon 1 over 32 examples composed the history below, on which Opacus's
PRV accountant raises "Discrete mean differs significantly from continuous mean."; the
gate's RuntimeError made POST /v1/runs answer 500.
"""

from __future__ import annotations

import pytest

from privacy.accounting import compose_epsilon, create_accountant

HISTORY = [(0.02458178617851671, 1.0, 1), (10.0, 1.0, 2)]
DELTA = 1e-5


def test_the_prv_accountant_fails_on_this_history() -> None:
    acc = create_accountant("prv")
    acc.history = list(HISTORY)
    with pytest.raises(RuntimeError, match="Discrete mean"):
        acc.get_epsilon(delta=DELTA)


def test_compose_epsilon_answers_with_the_rdp_bound_never_less() -> None:
    got = compose_epsilon(HISTORY, DELTA)
    assert got == compose_epsilon(HISTORY, DELTA, accountant="rdp")
    # At least what the first release alone costs under PRV (a low-noise release).
    assert got >= compose_epsilon(HISTORY[:1], DELTA)
    assert got > 0
