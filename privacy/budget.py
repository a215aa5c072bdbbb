"""The budget gate: would these releases push a tenant (or a dataset) past its budget?

A tenant has one epsilon budget at a fixed delta (kept on the tenant row); a dataset
of that tenant may have a tighter budget of its own. Every change of either is an
entry in the tenant's budget chain (``privacy.ledger.BudgetChange``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from sqlmodel import Session

from privacy.accounting import DEFAULT_ACCOUNTANT, compose_epsilon
from privacy.ledger import (
    TENANT_WIDE,
    BudgetChange,
    budget_changes,
    check_dataset,
    record_budget_change,
    tenant_events,
)
from privacy.params import DPParams


class BudgetError(ValueError):
    """A budget change that cannot be made; the message says why."""


# The largest epsilon budget an operator lets tenants set unless configured otherwise
# (FEDTEXT_MAX_BUDGET_EPSILON). Past a few tens, an epsilon bounds nothing a reader could
# use; an unbounded value (1e308, Infinity) would make the gate a formality.
DEFAULT_MAX_EPSILON = 100.0


def check_epsilon_budget(epsilon: float, *, max_epsilon: float = DEFAULT_MAX_EPSILON) -> None:
    """BudgetError unless ``epsilon`` is a finite positive number within ``max_epsilon``."""
    if not (isinstance(epsilon, int | float) and math.isfinite(epsilon)):
        raise BudgetError("The epsilon budget should be a finite number.")
    if epsilon <= 0:
        raise BudgetError("The epsilon budget should be a positive value.")
    if epsilon > max_epsilon:
        raise BudgetError(
            f"The epsilon budget {epsilon:g} exceeds this platform's bound of {max_epsilon:g} "
            "(the operator's FEDTEXT_MAX_BUDGET_EPSILON)."
        )


class HasBudget(Protocol):
    """What the gate needs of a tenant (privacy/ does not import tenancy/)."""

    id: str
    budget_epsilon: float
    budget_delta: float


@dataclass(frozen=True)
class BudgetDecision:
    allowed: bool
    budget: float
    spent: float
    requested: float  # the increase these releases would cause (on top of reservations)
    after: float
    delta: float
    scope: str = TENANT_WIDE  # TENANT_WIDE, or the dataset whose own budget decided
    reserved: float = 0.0  # the increase other runs' reservations cause on top of spent
    tampered: str | None = None  # set when the budget in force contradicts its chain

    @property
    def remaining(self) -> float:
        """What is left for new runs: the budget less spent and reserved."""
        return max(0.0, self.budget - self.spent - self.reserved)

    @property
    def reason(self) -> str:
        if self.tampered:
            return self.tampered
        verdict = "within" if self.allowed else "would exceed"
        what = "budget" if self.scope == TENANT_WIDE else f"the budget of dataset {self.scope!r}"
        return (
            f"{verdict} {what}: budget epsilon {self.budget:.3f} at delta {self.delta:g}, "
            f"spent {self.spent:.3f}, reserved by other runs {self.reserved:.3f}, "
            f"remaining {self.remaining:.3f}, requested {self.requested:.3f} "
            f"(total {self.after:.3f})"
        )


def check_budget(
    spent_events: Sequence[DPParams],
    new_events: Sequence[DPParams],
    *,
    budget_epsilon: float,
    delta: float,
    accountant: str = DEFAULT_ACCOUNTANT,
    scope: str = TENANT_WIDE,
    reserved_events: Sequence[DPParams] = (),
) -> BudgetDecision:
    """Compose past, reserved and prospective releases and compare with the budget.

    ``reserved_events`` are the releases other runs have reserved and not yet charged;
    they count as spent for this decision, so two runs never both fit one remainder.
    """
    spent = compose_epsilon(spent_events, delta, accountant)
    held = compose_epsilon([*spent_events, *reserved_events], delta, accountant)
    after = compose_epsilon([*spent_events, *reserved_events, *new_events], delta, accountant)
    # Tiny tolerance: the PRV accountant's own estimation error must not refuse exact fits.
    return BudgetDecision(
        allowed=after <= budget_epsilon * (1 + 1e-9) + 1e-9,
        budget=budget_epsilon,
        spent=spent,
        requested=after - held,
        after=after,
        delta=delta,
        scope=scope,
        reserved=held - spent,
    )


def recorded_budget(session: Session, tenant: HasBudget) -> tuple[float, str | None]:
    """The tenant-wide budget of record and, if the tenant row contradicts it, why.

    The budget chain is the record: the tenant row is a copy that ``change_budget``
    keeps equal. A row edited behind the chain's back (``UPDATE tenant SET
    budget_epsilon = ...``) is not trusted: the gate refuses until it is resolved.
    """
    changes = budget_changes(session, tenant.id)
    wide = [c for c in changes if c.dataset == TENANT_WIDE]
    if not wide:
        return tenant.budget_epsilon, None  # a tenant from before budgets were chained
    last = wide[-1]
    if not math.isclose(last.new_epsilon, tenant.budget_epsilon) or not math.isclose(
        last.delta, tenant.budget_delta
    ):
        return min(last.new_epsilon, tenant.budget_epsilon), (
            f"refused: the tenant's budget (epsilon {tenant.budget_epsilon:g}, delta "
            f"{tenant.budget_delta:g}) differs from its budget chain (epsilon "
            f"{last.new_epsilon:g}, delta {last.delta:g}); it was changed outside the "
            "record. Run `fedtext audit verify` and restore it."
        )
    return last.new_epsilon, None


def dataset_budgets(session: Session, tenant_id: str) -> dict[str, float]:
    """The current own budget of each dataset that has one (the latest change wins)."""
    current: dict[str, float] = {}
    for change in budget_changes(session, tenant_id):
        if change.dataset != TENANT_WIDE:
            current[change.dataset] = change.new_epsilon
    return current


def check_release(
    session: Session,
    *,
    tenant: HasBudget,
    dataset: str,
    new_events: Sequence[DPParams],
    reserved: Sequence[tuple[str, DPParams]] = (),
) -> BudgetDecision:
    """The gate before dispatch: the tenant's budget and, if it has one, the dataset's.

    The tenant figure composes every release of the tenant, whatever its dataset:
    datasets of one tenant may hold the same people, so no parallel composition is
    assumed. ``reserved`` holds other runs' uncharged reservations as (dataset, release).
    Returns the first refusal, else the tenant-wide decision. Call it under
    ``privacy.ledger.lock_tenant`` when its answer must still hold at the append.
    """
    past = tenant_events(session, tenant.id)
    budget, tampered = recorded_budget(session, tenant)
    decision = check_budget(
        [e.params() for e in past],
        new_events,
        budget_epsilon=budget,
        delta=tenant.budget_delta,
        reserved_events=[p for _, p in reserved],
    )
    if tampered:
        return dataclasses.replace(decision, allowed=False, tampered=tampered)
    if not decision.allowed:
        return decision
    own = dataset_budgets(session, tenant.id).get(dataset)
    if own is not None:
        in_dataset = check_budget(
            [e.params() for e in past if e.dataset == dataset],
            new_events,
            budget_epsilon=own,
            delta=tenant.budget_delta,
            scope=dataset,
            reserved_events=[p for d, p in reserved if d == dataset],
        )
        if not in_dataset.allowed:
            return in_dataset
    return decision


def change_budget(
    session: Session,
    *,
    tenant: HasBudget,
    new_epsilon: float,
    actor: str,
    reason: str = "",
    dataset: str = TENANT_WIDE,
    max_epsilon: float = DEFAULT_MAX_EPSILON,
) -> BudgetChange:
    """Set the tenant's (or one dataset's) epsilon budget and record the change.

    The delta stays the tenant's: a budget is an epsilon at a fixed delta, and
    moving delta would silently change what every past figure means. The caller
    commits; the tenant row and the chain entry change in the same transaction.

    Raises
    ------
    BudgetError
        If ``new_epsilon`` is not a positive finite number within ``max_epsilon`` (the
        operator's bound), ``dataset`` is not a valid name, or ``actor`` is empty.
    """
    check_epsilon_budget(new_epsilon, max_epsilon=max_epsilon)
    if not actor.strip():
        raise BudgetError("A budget change needs the actor who makes it.")
    if len(reason) > 500:
        raise BudgetError("The reason should be at most 500 characters.")
    old: float | None
    if dataset == TENANT_WIDE:
        old = tenant.budget_epsilon
    else:
        try:
            check_dataset(dataset)
        except ValueError as exc:
            raise BudgetError(str(exc)) from None
        old = dataset_budgets(session, tenant.id).get(dataset)
    change = record_budget_change(
        session,
        tenant_id=tenant.id,
        dataset=dataset,
        old_epsilon=old,
        new_epsilon=float(new_epsilon),
        delta=tenant.budget_delta,
        actor=actor.strip(),
        reason=reason,
    )
    if dataset == TENANT_WIDE:
        tenant.budget_epsilon = float(new_epsilon)
        session.add(tenant)
    return change
