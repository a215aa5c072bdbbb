"""What an auditor is told about signed rows (``tenancy.signing``): what a status other than
"ok" means, which rows of a hash chain are not accepted, and which consents, policies and
model versions are not (what ``fedtext audit verify`` and ``sign-existing`` read)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from tenancy.signed_rows import (
    GOVERNANCE_TABLES,
    PARTNER_TABLE,
    POLICY_TABLE,
    VERSION_TABLE,
    row_message,
)
from tenancy.signing import Status, check

_DESCRIBE = {
    "unsigned": "unsigned: written before signatures (v0006) or by someone without the "
    "platform's signing key (if it is old and the chains check out, the operator signs it "
    "once with `fedtext audit sign-existing`)",
    "unknown-key": "signed by a key that is not in the trusted signing history",
    "bad": "its signature does not verify: the row was changed after it was signed",
}


def describe(status: Status) -> str:
    """What a status other than "ok" means, for an auditor."""
    return _DESCRIBE[status]


def chain_signature_problems(
    table: str, rows: Iterable[Any], trusted: Mapping[str, bytes]
) -> list[tuple[Any, Status]]:
    """The rows of one tenant's chain (in order) whose signature is not accepted.

    An unsigned entry followed by a validly signed one is accepted: that signature binds
    the later entry's ``prev_hash``, hence every entry before it (the chain check itself
    is ``privacy.ledger.verify_chain``'s). An unsigned entry with no signed one after it
    (an append made around the platform, or an old chain never signed) is not.
    """
    rows = list(rows)
    statuses = [check(r.signature, row_message(table, r), trusted) for r in rows]
    last_ok = max((i for i, s in enumerate(statuses) if s == "ok"), default=-1)
    return [
        (row, status)
        for i, (row, status) in enumerate(zip(rows, statuses, strict=True))
        if status != "ok" and not (status == "unsigned" and i < last_ok)
    ]


# ------------------------------------------- consents, policies and model versions (v0010)


def governance_rows(session: Any) -> dict[str, list[tuple[str, Any]]]:
    """Each tenant's signed governance rows, as (table, row): the consents it gave, its
    policy, its model versions (each checked alone: they are no chain)."""
    from sqlmodel import col, select

    from tenancy.governance import TenantPolicy
    from tenancy.tables import FederationPartner, ModelVersion

    rows: dict[str, list[tuple[str, Any]]] = {}
    for table, query in (
        (PARTNER_TABLE, select(FederationPartner).order_by(col(FederationPartner.created_at))),
        (POLICY_TABLE, select(TenantPolicy)),
        (
            VERSION_TABLE,
            select(ModelVersion).order_by(col(ModelVersion.name), col(ModelVersion.version)),
        ),
    ):
        for row in session.exec(query):
            rows.setdefault(row.tenant_id, []).append((table, row))
    return rows


def tenants_without_policy(session: Any) -> list[str]:
    """Live tenants with no policy row: each is created with one, so a missing row was
    deleted around the platform (or predates that rule); it is read as the strictest."""
    from sqlmodel import col, select

    from tenancy.governance import TenantPolicy
    from tenancy.tables import Tenant

    with_row = select(TenantPolicy.tenant_id)
    query = select(Tenant.id).where(
        col(Tenant.deleted_at).is_(None), col(Tenant.id).not_in(with_row)
    )
    return sorted(session.exec(query))


def governance_row_name(table: str, row: Any) -> str:
    """How an auditor is shown one governance row."""
    if table == PARTNER_TABLE:
        return f"consent to partner {row.partner_id} (given {row.created_at})"
    if table == POLICY_TABLE:
        epsilon = "none" if row.max_epsilon is None else f"{row.max_epsilon:g}"
        return (
            f"policy (deploy {row.deploy}, secure mode required {row.require_secure_mode}, "
            f"max epsilon {epsilon}, families {row.families or 'any'}, dataset "
            f"{row.dataset}; set by {row.updated_by!r})"
        )
    deployed = ", deployed" if row.deployed else ""
    return f"model {row.name} v{row.version} (id {row.id}{deployed})"


def governance_problems(session: Any, trusted: Mapping[str, bytes]) -> list[str]:
    """For ``fedtext audit verify``: each consent, policy and model version row, of every
    tenant, whose signature is not accepted (named), and each model with more than one
    version marked deployed."""
    found = []
    for tenant_id, rows in sorted(governance_rows(session).items()):
        for table, row in rows:
            status = check(row.signature, row_message(table, row), trusted)
            if status != "ok":
                found.append(
                    f"tenant {tenant_id} {governance_row_name(table, row)}: {describe(status)}"
                )
        found += _deployed_twice(tenant_id, rows)
    found += [
        f"tenant {tenant_id}: no policy row (each tenant is created with one): the strictest "
        "policy applies until `fedtext audit sign-existing` writes the default, or its admin "
        "sets one"
        for tenant_id in tenants_without_policy(session)
    ]
    return found


def _deployed_twice(tenant_id: str, rows: list[tuple[str, Any]]) -> list[str]:
    deployed: dict[str, list[int]] = {}
    for table, row in rows:
        if table == VERSION_TABLE and row.deployed:
            deployed.setdefault(row.name, []).append(row.version)
    return [
        f"tenant {tenant_id} model {name}: {len(versions)} versions marked deployed "
        f"({', '.join(f'v{v}' for v in versions)}); the platform deploys one"
        for name, versions in sorted(deployed.items())
        if len(versions) > 1
    ]


def unsigned_governance(
    session: Any, trusted: Mapping[str, bytes]
) -> tuple[list[tuple[str, Any]], list[str]]:
    """For ``fedtext audit sign-existing``: the unsigned governance rows to sign, as (table,
    row), and the blockers (a row whose signature is present but does not verify, a model
    with two versions deployed: tampering, not age; nothing should then be signed)."""
    todo: list[tuple[str, Any]] = []
    blockers: list[str] = []
    for tenant_id, rows in sorted(governance_rows(session).items()):
        for table, row in rows:
            status = check(row.signature, row_message(table, row), trusted)
            if status == "unsigned":
                todo.append((table, row))
            elif status != "ok":
                blockers.append(f"tenant {tenant_id} {governance_row_name(table, row)}: {status}")
        blockers += _deployed_twice(tenant_id, rows)
    from tenancy.governance import TenantPolicy

    # A tenant without a policy row gets the default one, written (and signed) here.
    todo += [
        (POLICY_TABLE, TenantPolicy(tenant_id=t, updated_by="fedtext audit sign-existing"))
        for t in tenants_without_policy(session)
    ]
    return todo, blockers


def sign_governance(session: Any, keys: Any, todo: Iterable[tuple[str, Any]]) -> dict[str, int]:
    """Sign ``todo`` (from ``unsigned_governance``) with ``keys`` (``SigningKeys``) by plain
    UPDATEs (the rows are not changed otherwise); the caller commits. Counts per table."""
    from sqlalchemy import inspect, update

    from tenancy.governance import TenantPolicy
    from tenancy.tables import FederationPartner, ModelVersion

    counts = dict.fromkeys(GOVERNANCE_TABLES, 0)
    for table, row in todo:
        signature = keys.sign(row_message(table, row))
        if inspect(row).transient:  # a default policy row written now
            row.signature = signature
            session.add(row)
            counts[table] += 1
            continue
        if table == PARTNER_TABLE:
            where: Any = (FederationPartner.tenant_id == row.tenant_id) & (
                FederationPartner.partner_id == row.partner_id
            )
            cls: Any = FederationPartner
        elif table == POLICY_TABLE:
            where, cls = TenantPolicy.tenant_id == row.tenant_id, TenantPolicy
        else:
            where, cls = ModelVersion.id == row.id, ModelVersion
        session.execute(update(cls).where(where).values(signature=signature))
        counts[table] += 1
    return counts


def governance_counts_text(counts: Mapping[str, int]) -> str:
    """``sign_governance``'s counts, for a person."""
    return (
        f"{counts.get(PARTNER_TABLE, 0)} consent(s), {counts.get(POLICY_TABLE, 0)} "
        f"polic(ies), {counts.get(VERSION_TABLE, 0)} model version(s)"
    )
