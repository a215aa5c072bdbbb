"""Per-tenant DP plan for a whole run, computed before round 1, and the budget gate."""

from __future__ import annotations

from dataclasses import dataclass

from privacy.accounting import compose_epsilon, noise_for_target
from privacy.budget import BudgetDecision, check_budget
from privacy.params import DPParams, poisson_schedule


@dataclass(frozen=True)
class TenantPlan:
    tenant_id: str
    tenant_name: str
    node_id: int
    num_train: int
    num_test: int
    round_params: DPParams  # charged once per dispatched round
    rounds: int
    budget: BudgetDecision

    @property
    def run_epsilon(self) -> float:
        return self.budget.requested


class PlanRefused(ValueError):
    """This tenant cannot take part in the run; the message says why."""


def plan_tenant(
    *,
    tenant_id: str,
    tenant_name: str,
    node_id: int,
    num_train: int,
    num_test: int,
    target_epsilon: float,
    delta: float,
    clip_norm: float,
    batch_size: int,
    local_epochs: int,
    rounds: int,
    budget_epsilon: float,
    spent_events: list[DPParams],
) -> TenantPlan:
    """The noise that meets ``target_epsilon`` over all ``rounds``, checked against the budget."""
    if num_train < 1:
        raise PlanRefused(f"tenant {tenant_name!r} reported no training examples")
    if delta >= 1.0 / num_train:
        raise PlanRefused(
            f"tenant {tenant_name!r}: delta {delta:g} is not below 1/n = {1 / num_train:.3g} "
            f"for its {num_train} training examples; lower the tenant's budget delta"
        )
    sample_rate, steps = poisson_schedule(num_train, batch_size, local_epochs)
    sigma = noise_for_target(target_epsilon, delta, sample_rate, steps * rounds)
    params = DPParams(sigma, sample_rate, steps, clip_norm, delta)
    decision = check_budget(
        spent_events, [params] * rounds, budget_epsilon=budget_epsilon, delta=delta
    )
    if not decision.allowed:
        raise PlanRefused(f"tenant {tenant_name!r} refused: {decision.reason}")
    return TenantPlan(
        tenant_id, tenant_name, node_id, num_train, num_test, params, rounds, decision
    )


def run_epsilon(plan: TenantPlan, rounds_done: int) -> float:
    """Epsilon this run has charged after ``rounds_done`` dispatched rounds."""
    return compose_epsilon([plan.round_params] * rounds_done, plan.round_params.delta)
