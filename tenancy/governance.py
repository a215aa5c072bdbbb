"""Each tenant governs what happens to it: its deploy policy, its floor for run settings
and the dataset its budget is charged under for simulated runs.

A partner may include a tenant in a run only with its consent (``federation_partner``);
even then the tenant's own policy decides what the run may do to it:

- **deploy**: whether a version made by any run it joins serves at once. The effective
  policy is the stricter of the tenant's and the run's request, so a partner's
  ``"deploy": "always"`` never replaces the tenant's serving version unless the tenant's
  own policy allows it.
- **floor**: the settings a run must meet to include the tenant (secure mode required,
  a largest epsilon per run, allowed model families); a run below it is refused for the
  tenant before round 1, naming the setting and nothing else of the tenant's.
- **dataset**: the dataset a simulated run charges (a federation node declares its own).

Every tenant gets a signed ``DEFAULT_POLICY`` row when it is created; a tenant with *no*
row (deleted around the platform, or made before this rule and not yet given one by
``fedtext audit sign-existing``) gets ``UNSIGNED_POLICY``, as a forged row does: a writer
of the database cannot loosen a policy by deleting it. A policy row whose signature does
not verify (written around the platform, or before revision 0010 and not yet signed with
``fedtext audit sign-existing``) is not applied: the tenant gets ``UNSIGNED_POLICY``, the
strictest there is (it takes part in no run and no version deploys for it), and every
refusal and ``GET /v1/policy`` say why.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlmodel import Field, Session, SQLModel

from tenancy.errors import InvalidInput
from tenancy.signing import mark_repaired, policy_row_trusted
from tenancy.tables import Tenant, utcnow

# From the loosest to the strictest: each policy deploys a subset of what the one before
# it deploys (always: every version; if-better: the first or a better one; first: only the
# first; never: none).
DEPLOY_ORDER = ("always", "if-better", "first", "never")
DEFAULT_DATASET = "default"
# What a run below an unsigned policy's floor is told (the one "setting" it fails).
UNSIGNED_SETTING = "a signed policy (the stored one does not verify: `fedtext audit verify`)"


class TenantPolicy(SQLModel, table=True):
    """One tenant's governance, set by its admin (or the operator)."""

    __tablename__ = "tenant_policy"
    tenant_id: str = Field(foreign_key="tenant.id", primary_key=True)
    deploy: str = Field(default="if-better", max_length=16)
    require_secure_mode: bool = False
    max_epsilon: float | None = None  # largest target epsilon per run; None: the budget's
    families: str = Field(default="", max_length=200)  # comma-separated; empty: any
    dataset: str = Field(default=DEFAULT_DATASET, max_length=63)
    updated_at: datetime = Field(default_factory=utcnow)
    updated_by: str = Field(default="", max_length=100)
    # Ed25519 by the platform's signing key (tenancy/signing.py): a policy written around
    # the platform is not applied (``get_policy``).
    signature: str | None = Field(default=None, max_length=160)

    def family_list(self) -> list[str]:
        return [f for f in self.families.split(",") if f]


@dataclass(frozen=True)
class Policy:
    """A tenant's policy as plain values (what the rules read)."""

    deploy: str = "if-better"
    require_secure_mode: bool = False
    max_epsilon: float | None = None
    families: tuple[str, ...] = ()
    dataset: str = DEFAULT_DATASET
    # False: the stored row's signature did not verify; this is ``UNSIGNED_POLICY``.
    signed: bool = True

    @classmethod
    def of(cls, row: TenantPolicy) -> Policy:
        return cls(
            row.deploy,
            row.require_secure_mode,
            row.max_epsilon,
            tuple(row.family_list()),
            row.dataset,
        )


DEFAULT_POLICY = Policy()
# Applied in place of a policy row that does not verify: deploys nothing, and every run
# that would include the tenant is refused (``below_floor``).
UNSIGNED_POLICY = Policy(deploy="never", require_secure_mode=True, signed=False)


def get_policy(*, session: Session, tenant_id: str) -> Policy:
    """The tenant's policy (``UNSIGNED_POLICY`` when its row is missing or its signature
    does not verify, logged)."""
    row = session.get(TenantPolicy, tenant_id)
    if row is None or not policy_row_trusted(session.get_bind().engine, row):
        return UNSIGNED_POLICY
    return Policy.of(row)


def set_policy(
    *,
    session: Session,
    tenant_id: str,
    actor: str,
    deploy: str | None = None,
    require_secure_mode: bool | None = None,
    max_epsilon: float | None = None,
    clear_max_epsilon: bool = False,
    families: Iterable[str] | None = None,
    dataset: str | None = None,
) -> Policy:
    """Change the given parts of the tenant's policy (None: unchanged); the caller commits.

    The caller validates family and dataset names against the platform's (tenancy does
    not know the model families); InvalidInput for a value no policy can hold.
    """
    row = session.get(TenantPolicy, tenant_id)
    if row is None:
        row = TenantPolicy(tenant_id=tenant_id)
    elif not policy_row_trusted(session.get_bind().engine, row):
        # What was written around the platform is not kept under a new signature: the
        # admin's change applies to the defaults.
        fresh = TenantPolicy(tenant_id=tenant_id)
        for field in ("deploy", "require_secure_mode", "max_epsilon", "families", "dataset"):
            setattr(row, field, getattr(fresh, field))
        mark_repaired(row)
    if deploy is not None:
        if deploy not in DEPLOY_ORDER:
            known = ", ".join(DEPLOY_ORDER)
            raise InvalidInput(f"Unknown deploy policy {deploy!r}; known: {known}.")
        row.deploy = deploy
    if require_secure_mode is not None:
        row.require_secure_mode = require_secure_mode
    if clear_max_epsilon and max_epsilon is not None:
        raise InvalidInput("Give max_epsilon or clear_max_epsilon, not both.")
    if clear_max_epsilon:
        row.max_epsilon = None
    elif max_epsilon is not None:
        if not 0 < max_epsilon <= 1e6:
            raise InvalidInput("max_epsilon should be a positive value.")
        row.max_epsilon = float(max_epsilon)
    if families is not None:
        names = sorted({f.strip().lower() for f in families if f.strip()})
        row.families = ",".join(names)
    if dataset is not None:
        row.dataset = dataset
    row.updated_at = utcnow()
    row.updated_by = actor[:100]
    session.add(row)
    session.flush()
    return Policy.of(row)


def stricter_deploy(*policies: str) -> str:
    """The strictest of ``policies`` (``DEPLOY_ORDER``)."""
    return max(policies, key=DEPLOY_ORDER.index)


def below_floor(policy: Policy, *, secure_mode: bool, epsilon: float, family: str) -> list[str]:
    """The run settings below the tenant's floor, by their run-config names (empty: none).
    Under an unsigned policy every run is below it (``UNSIGNED_SETTING``)."""
    if not policy.signed:
        return [UNSIGNED_SETTING]
    out = []
    if policy.require_secure_mode and not secure_mode:
        out.append("secure_mode")
    if policy.max_epsilon is not None and epsilon > policy.max_epsilon * (1 + 1e-12):
        out.append("epsilon")
    if policy.families and family not in policy.families:
        out.append("model")
    return out


def effective_deploy(session: Session, tenant_id: str, *requested: str) -> str:
    """The deploy policy that applies to the tenant: the strictest of its own policy (as it
    stands now) and every ``requested`` one (the run's, the one recorded at planning)."""
    return stricter_deploy(get_policy(session=session, tenant_id=tenant_id).deploy, *requested)


def live_tenant(session: Session, tenant_id: str) -> Tenant | None:
    """The tenant read fresh from the database (after the privacy gate's lock), or None
    when it is missing or deleted: what ``privacy.gate.PrivacyGate`` loads."""
    tenant = session.get(Tenant, tenant_id, populate_existing=True)
    return None if tenant is None or tenant.deleted_at is not None else tenant
