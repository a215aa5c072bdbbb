"""Tenant governance (admin): what runs that include the caller's tenant may do to it.

``GET /v1/policy`` reads and ``PUT /v1/policy`` changes the tenant's own deploy policy for
versions made by any run it joins (the stricter of it and the run's request applies), its
floor for run settings (secure mode required, largest epsilon per run, allowed model
families: a run below it is refused for this tenant before round 1, naming the setting)
and the dataset its budget is charged under on simulated runs (a federation node
declares its own).

A stored policy whose signature does not verify (written around the platform) is not
applied: the strictest policy is, and ``GET`` answers it with a ``Warning`` header saying
so; the admin's next ``PUT`` replaces it (starting from the defaults, not from what was
forged).
"""

from __future__ import annotations

from fastapi import APIRouter, Response

from models.family_defaults import families
from privacy.ledger import check_dataset
from serving.protocols.v1.deps import AdminCaller, SessionDep
from serving.refusals import refusal_for
from serving.schemas import PolicyPublic, PolicyUpdate
from tenancy.errors import InvalidInput
from tenancy.governance import Policy, get_policy, set_policy

router = APIRouter(prefix="/v1/policy", tags=["policy"])


def _public(policy: Policy) -> PolicyPublic:
    return PolicyPublic(
        deploy=policy.deploy,  # type: ignore[arg-type]
        require_secure_mode=policy.require_secure_mode,
        max_epsilon=policy.max_epsilon,
        families=list(policy.families),
        dataset=policy.dataset,
    )


def check_policy_names(*, family_names: list[str] | None, dataset: str | None) -> None:
    """InvalidInput for a family the platform does not have or an invalid dataset name."""
    if family_names is not None:
        known = families()
        unknown = sorted({f.strip().lower() for f in family_names} - set(known))
        if unknown:
            raise InvalidInput(
                f"Unknown model family {', '.join(unknown)}; known: {', '.join(known)}."
            )
    if dataset is not None:
        try:
            check_dataset(dataset)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None


UNSIGNED_WARNING = (
    '299 fedtext "The stored policy is not signed by the platform (changed around it): '
    "it is not applied; these strictest settings are, and every run including this tenant "
    'is refused until an admin sets the policy again (PUT /v1/policy)."'
)


@router.get("", response_model=PolicyPublic)
def read_policy(caller: AdminCaller, session: SessionDep, response: Response) -> PolicyPublic:
    """The policy that applies to the caller's tenant (the defaults until its admin sets
    one; the strictest, with a ``Warning`` header, when the stored one does not verify)."""
    policy = get_policy(session=session, tenant_id=caller.tenant.id)
    if not policy.signed:
        response.headers["Warning"] = UNSIGNED_WARNING
    return _public(policy)


@router.put("", response_model=PolicyPublic)
def update_policy(body: PolicyUpdate, caller: AdminCaller, session: SessionDep) -> PolicyPublic:
    """Change the given parts of the policy; runs planned later follow it, and a run's
    release reads it again before deploying."""
    try:
        check_policy_names(family_names=body.families, dataset=body.dataset)
        policy = set_policy(
            session=session,
            tenant_id=caller.tenant.id,
            actor=f"admin key {caller.key.prefix}",
            deploy=body.deploy,
            require_secure_mode=body.require_secure_mode,
            max_epsilon=body.max_epsilon,
            clear_max_epsilon=body.clear_max_epsilon,
            families=body.families,
            dataset=body.dataset,
        )
    except InvalidInput as exc:
        raise refusal_for(exc) from None
    session.commit()
    return _public(policy)
