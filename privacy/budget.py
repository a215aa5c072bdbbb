"""The budget gate: would these releases push a tenant past its epsilon budget?"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from privacy.accounting import DEFAULT_ACCOUNTANT, compose_epsilon
from privacy.params import DPParams


@dataclass(frozen=True)
class BudgetDecision:
    allowed: bool
    budget: float
    spent: float
    requested: float  # the increase these releases would cause
    after: float
    delta: float

    @property
    def reason(self) -> str:
        verdict = "within" if self.allowed else "would exceed"
        return (
            f"{verdict} budget: budget epsilon {self.budget:.3f} at delta {self.delta:g}, "
            f"spent {self.spent:.3f}, requested {self.requested:.3f} "
            f"(total {self.after:.3f})"
        )


def check_budget(
    spent_events: Sequence[DPParams],
    new_events: Sequence[DPParams],
    *,
    budget_epsilon: float,
    delta: float,
    accountant: str = DEFAULT_ACCOUNTANT,
) -> BudgetDecision:
    """Compose past and prospective releases and compare with the budget."""
    spent = compose_epsilon(spent_events, delta, accountant)
    after = compose_epsilon([*spent_events, *new_events], delta, accountant)
    # Tiny tolerance: the PRV accountant's own estimation error must not refuse exact fits.
    return BudgetDecision(
        allowed=after <= budget_epsilon * (1 + 1e-9) + 1e-9,
        budget=budget_epsilon,
        spent=spent,
        requested=after - spent,
        after=after,
        delta=delta,
    )
