"""Per-tenant DP plan for a whole run, computed before round 1, and the budget gate."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from privacy.accounting import compose_epsilon, noise_for_target
from privacy.budget import BudgetDecision, check_budget
from privacy.gate import round_target
from privacy.params import DPParams, dp_batch_size, poisson_schedule
from privacy.reservations import PlannedRelease
from privacy.schemas import DEFAULT_DATASET


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
    # The DP release of the final evaluation's confusion matrices (one Gaussian step per
    # matrix, sensitivity 1 count); None when the run releases no evaluation.
    eval_params: DPParams | None = None
    # The dataset this tenant's charges land on (its node's declaration on a federation,
    # its admin's policy on a simulation), never the run creator's label.
    dataset: str = DEFAULT_DATASET
    # The settings that applied to this tenant (canonical JSON), kept on its ledger entries.
    applied_json: str = "{}"
    # The effective deploy policy: the stricter of the tenant's and the run's.
    deploy: str = "if-better"

    @property
    def run_epsilon(self) -> float:
        return self.budget.requested

    def releases(self) -> list[PlannedRelease]:
        """Every release the run plans for this tenant, as reserved and then charged."""
        out = [PlannedRelease(r, "train", self.round_params) for r in range(1, self.rounds + 1)]
        if self.personal_params:
            out.append(PlannedRelease(self.rounds + 1, "personalize", self.personal_params))
        if self.eval_params:
            out.append(PlannedRelease(self.rounds + 1, "evaluate", self.eval_params))
        return out


class PlanRefused(ValueError):
    """This tenant cannot take part in the run; the message says why."""


# Beyond this much noise per step DP-SGD learns nothing useful: refuse instead of wasting budget.
MAX_NOISE_MULTIPLIER = 20.0


def suggest_batch(num_train: int) -> int:
    """A batch size that gives DP-SGD several steps per epoch: a power of two near n / 5."""
    batch = 1
    while batch * 2 <= max(1, num_train // 5):
        batch *= 2
    return batch


def dp_schedule(
    *,
    tenant_name: str,
    num_train: int,
    target_epsilon: float,
    delta: float,
    batch_size: int,
    local_epochs: int,
    rounds: int,
    personalize_epochs: int = 0,
    unit: str = "example",
) -> tuple[float, float, int, int]:
    """The noise multiplier, sample rate, steps per round and personalization steps that
    meet ``target_epsilon``; PlanRefused, saying what to change, when the data cannot.

    The same check runs before anything trains or is charged: in `fedtext simulate` on the
    tenants' files, for `POST /v1/runs` on its example caps, and in the ServerApp on what
    each node reports.
    """
    # privacy-unit user: num_train counts users, batch_size expected users per step.
    units = "users" if unit == "user" else "training examples"
    if num_train < 1:
        raise PlanRefused(f"tenant {tenant_name!r} reported no {units}")
    batch_size = dp_batch_size(num_train, batch_size)  # 0: sized by this tenant's data
    if num_train < batch_size:
        fit = suggest_batch(num_train)
        raise PlanRefused(
            f"tenant {tenant_name!r} has {num_train} {units}, fewer than the "
            f"batch size {batch_size}: DP-SGD needs at least {batch_size} at batch size "
            f"{batch_size}; use batch size {fit} (--batch-size {fit}) or add data"
        )
    if delta >= 1.0 / num_train:
        raise PlanRefused(
            f"tenant {tenant_name!r}: delta {delta:g} is not below 1/n = {1 / num_train:.3g} "
            f"for its {num_train} {units}; lower the tenant's budget delta"
        )
    sample_rate, steps = poisson_schedule(num_train, batch_size, local_epochs)
    personal_steps = 0
    if personalize_epochs:
        personal_steps = poisson_schedule(num_train, batch_size, personalize_epochs)[1]
    total_steps = steps * rounds + personal_steps
    try:
        # The target rounded down to 3 significant digits: a cached search for every
        # request near it (refusals stay cheap), and never less noise than asked.
        sigma = noise_for_target(round_target(target_epsilon), delta, sample_rate, total_steps)
    except ValueError:  # the accountant finds no noise small enough to search for
        sigma = math.inf
    if sigma > MAX_NOISE_MULTIPLIER:
        fits = ""
        if unit == "user":
            fits = _what_fits(num_train, delta, sample_rate, total_steps)
        raise PlanRefused(
            f"tenant {tenant_name!r} has {num_train} {units}: epsilon "
            f"{target_epsilon:g} over {total_steps} steps at sample rate {sample_rate:.3g} "
            f"needs noise multiplier {sigma:.1f} (> {MAX_NOISE_MULTIPLIER:g}); raise epsilon "
            "(--epsilon), lower the batch size (--batch-size), train fewer rounds (--rounds) "
            f"or add data{fits}"
        )
    return sigma, sample_rate, steps, personal_steps


def _what_fits(num_users: int, delta: float, sample_rate: float, steps: int) -> str:
    """For a refused user-level plan: the smallest epsilon this schedule meets with the
    largest noise allowed."""
    best = compose_epsilon([DPParams(MAX_NOISE_MULTIPLIER, sample_rate, steps, 1.0, delta)], delta)
    return (
        f"; with {num_users} users this schedule fits epsilon {math.ceil(best * 100) / 100:g} "
        "or more (privacy-unit user: each person is one unit, so a tenant needs many "
        "people, not many rows)"
    )


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
    eval_noise: float = 0.0,
    reserved_events: list[DPParams] | None = None,
    privacy_unit: str = "example",
    max_examples_per_user: int = 1,
) -> TenantPlan:
    """The noise that meets ``target_epsilon`` over all rounds and personalization.

    Every training release of the run (``rounds`` federated rounds and the optional
    personal fine-tune) shares one noise multiplier, computed before round 1. With
    ``eval_noise`` > 0 the final evaluation is released as confusion matrices with
    Gaussian noise of that standard deviation per count (one matrix for the global
    model, a second for the personalized one), charged on top of ``target_epsilon``.
    The whole run is checked against the tenant's budget less ``reserved_events``
    (other runs' reservations).

    With ``privacy_unit`` "user", ``num_train`` counts the tenant's users and
    ``batch_size`` the expected users per step (0: sized by the users); each user keeps at
    most ``max_examples_per_user`` (k) rows, in training and in the held-out evaluation, so
    one user moves at most k counts of a released confusion matrix: L2 sensitivity k, and
    the evaluation's noise multiplier is eval_noise / k.
    """
    sigma, sample_rate, steps, personal_steps = dp_schedule(
        tenant_name=tenant_name,
        num_train=num_train,
        target_epsilon=target_epsilon,
        delta=delta,
        batch_size=batch_size,
        local_epochs=local_epochs,
        rounds=rounds,
        personalize_epochs=personalize_epochs,
        unit=privacy_unit,
    )
    sensitivity = max_examples_per_user if privacy_unit == "user" else 1
    params = DPParams(sigma, sample_rate, steps, clip_norm, delta)
    personal = (
        DPParams(sigma, sample_rate, personal_steps, clip_norm, delta) if personal_steps else None
    )
    evaluation = (
        # One count per cell changes by 1 when one example is added or removed: L2
        # sensitivity 1 per matrix, a Gaussian mechanism (q = 1) per matrix released.
        # privacy-unit user: one user moves up to k counts, sensitivity k.
        DPParams(eval_noise / sensitivity, 1.0, 2 if personal else 1, float(sensitivity), delta)
        if eval_noise > 0
        else None
    )
    plan = TenantPlan(
        tenant_id, tenant_name, node_id, num_train, num_test, params, rounds,
        check_budget([], [], budget_epsilon=budget_epsilon, delta=delta), personal, evaluation,
    )  # fmt: skip
    decision = check_budget(
        spent_events,
        [r.params for r in plan.releases()],
        budget_epsilon=budget_epsilon,
        delta=delta,
        reserved_events=reserved_events or [],
    )
    if not decision.allowed:
        raise PlanRefused(f"tenant {tenant_name!r} refused: {decision.reason}")
    return dataclasses.replace(plan, budget=decision)


def charged_epsilon(events: list[DPParams], delta: float) -> float:
    """Epsilon of the releases a run actually charged."""
    return compose_epsilon(events, delta)
