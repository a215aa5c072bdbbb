"""Budget checks a simulated run makes before Flower starts (and before any progress bar).

The ServerApp's privacy gate still decides, under the tenant's lock, before round 1;
this answers the common refusal (the run does not fit what is left of a tenant's budget)
in a second instead of after the simulation has started its nodes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from sqlmodel import Session

from privacy.budget import check_release
from privacy.schemas import DEFAULT_DATASET
from runs.spec import RunSpec
from server.planning import PlanRefused, plan_tenant
from tenancy.errors import NotFound
from tenancy.platform import Platform
from tenancy.tenants import get_tenant


class BudgetRefused(ValueError):
    """The run does not fit a tenant's budget; the message says what to do."""


def check_budgets(platform: Platform, spec: RunSpec, train_counts: Mapping[str, int]) -> None:
    """Refuse, with what to do, a run whose planned releases do not fit an existing
    tenant's budget (spent releases composed with this run's training, personalization
    and released evaluation, as the ServerApp plans them)."""
    refusals = []
    with Session(platform.engine) as session:
        for name, n in train_counts.items():
            try:
                tenant = get_tenant(session=session, name=name)
            except NotFound:
                continue  # created by the run with the default budget; the gate checks it
            try:
                plan = plan_tenant(
                    tenant_id=tenant.id,
                    tenant_name=name,
                    node_id=0,
                    num_train=n,
                    num_test=0,
                    target_epsilon=spec.epsilon,
                    delta=tenant.budget_delta,
                    clip_norm=spec.clip_norm,
                    batch_size=spec.batch_size,
                    local_epochs=spec.local_epochs,
                    rounds=spec.rounds,
                    budget_epsilon=math.inf,
                    spent_events=[],
                    personalize_epochs=spec.personalize_epochs,
                    eval_noise=spec.eval_noise,
                    privacy_unit=spec.privacy_unit,
                    max_examples_per_user=spec.max_examples_per_user,
                )
            except PlanRefused:
                continue  # the size checks (orchestration.simulation.preflight) say what to change
            decision = check_release(
                session,
                tenant=tenant,
                dataset=DEFAULT_DATASET,
                new_events=[r.params for r in plan.releases()],
            )
            if not decision.allowed:
                refusals.append(
                    f"tenant {name!r} {decision.reason}. Lower --epsilon, or raise the "
                    f"budget: fedtext tenant budget {name} --epsilon E --reason R"
                )
    if refusals:
        raise BudgetRefused(
            "The run does not fit the privacy budget (nothing was trained or charged): "
            + "; ".join(refusals)
        )
