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
    personal_params: DPParams | None = None  # the personalization fine-tune, if any

    @property
    def run_epsilon(self) -> float:
        return self.budget.requested


class PlanRefused(ValueError):
    """This tenant cannot take part in the run; the message says why."""


# Beyond this much noise per step DP-SGD learns nothing useful: refuse instead of wasting budget.
MAX_NOISE_MULTIPLIER = 20.0


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
    personalize_epochs: int = 0,
) -> TenantPlan:
    """The noise that meets ``target_epsilon`` over all rounds and personalization.

    Every release of the run (``rounds`` federated rounds and the optional personal
    fine-tune) shares one noise multiplier, computed before round 1, and the whole
    run is checked against the tenant's budget.
    """
    if num_train < 1:
        raise PlanRefused(f"tenant {tenant_name!r} reported no training examples")
    if num_train < batch_size:
        raise PlanRefused(
            f"tenant {tenant_name!r} has {num_train} training examples, fewer than the "
            f"batch size {batch_size}; lower the batch size or add data"
        )
    if delta >= 1.0 / num_train:
        raise PlanRefused(
            f"tenant {tenant_name!r}: delta {delta:g} is not below 1/n = {1 / num_train:.3g} "
            f"for its {num_train} training examples; lower the tenant's budget delta"
        )
    sample_rate, steps = poisson_schedule(num_train, batch_size, local_epochs)
    personal_steps = 0
    if personalize_epochs:
        personal_steps = poisson_schedule(num_train, batch_size, personalize_epochs)[1]
    total_steps = steps * rounds + personal_steps
    sigma = noise_for_target(target_epsilon, delta, sample_rate, total_steps)
    if sigma > MAX_NOISE_MULTIPLIER:
        raise PlanRefused(
            f"tenant {tenant_name!r}: epsilon {target_epsilon:g} over {total_steps} steps at "
            f"sample rate {sample_rate:.3g} needs noise multiplier {sigma:.1f} "
            f"(> {MAX_NOISE_MULTIPLIER:g}); raise epsilon or the batch size, or train fewer rounds"
        )
    params = DPParams(sigma, sample_rate, steps, clip_norm, delta)
    personal = (
        DPParams(sigma, sample_rate, personal_steps, clip_norm, delta) if personal_steps else None
    )
    releases = [params] * rounds + ([personal] if personal else [])
    decision = check_budget(spent_events, releases, budget_epsilon=budget_epsilon, delta=delta)
    if not decision.allowed:
        raise PlanRefused(f"tenant {tenant_name!r} refused: {decision.reason}")
    return TenantPlan(
        tenant_id, tenant_name, node_id, num_train, num_test, params, rounds, decision, personal
    )


def charged_epsilon(events: list[DPParams], delta: float) -> float:
    """Epsilon of the releases a run actually charged."""
    return compose_epsilon(events, delta)
