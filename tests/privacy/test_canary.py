"""The one-run audit bound against known answers; canaries are a pure function of the seed."""

from __future__ import annotations

import math

import pytest

from privacy.canary import audit_scores, epsilon_lower_bound, make_canaries, p_value


def test_canaries_are_deterministic_distinct_and_about_half_members() -> None:
    a, b = make_canaries(11, 200, 3), make_canaries(11, 200, 3)
    assert a == b and a != make_canaries(12, 200, 3)
    assert len({c.text for c in a}) == 200
    assert 70 <= sum(c.member for c in a) <= 130
    assert {c.label for c in a} == {0, 1, 2}


def test_pure_dp_bound_has_a_closed_form() -> None:
    # delta = 0 and all r guesses right: P[Bin(r, q) >= r] = q^r = p  =>  q = p^(1/r).
    q = 0.05 ** (1 / 100)
    assert epsilon_lower_bound(100, 100, 100, 0.0, 0.95) == pytest.approx(
        math.log(q / (1 - q)), rel=1e-6
    )


def test_chance_level_guessing_proves_nothing_and_delta_weakens_the_bound() -> None:
    assert epsilon_lower_bound(64, 32, 16, 1e-5) == 0.0
    assert p_value(1000, 500, 250, 0.0, 0.0) > 0.4
    strict = epsilon_lower_bound(1000, 500, 450, 0.0)
    loose = epsilon_lower_bound(1000, 500, 450, 1e-4)
    assert 0 < loose < strict


def test_audit_scores_guesses_on_the_extremes() -> None:
    members = [i % 2 == 0 for i in range(400)]
    perfect = audit_scores([1.0 if m else 0.0 for m in members], members, delta=0.0, guesses=200)
    assert perfect.correct == 200 and perfect.epsilon_lower_bound > 3
    useless = audit_scores([0.5] * 400, members, delta=0.0, guesses=200)
    assert useless.epsilon_lower_bound < perfect.epsilon_lower_bound
    with pytest.raises(ValueError, match="same length"):
        audit_scores([1.0], [True, False], delta=0.0)
