"""`fedtext tenant ...`: create, list, budget and delete tenants (operator)."""

from __future__ import annotations

import os
from typing import Annotated

import typer
from rich.table import Table

from fedtext.cli.console import UserError, console, group, open_platform, settings

tenant_app = group("Create and list tenants (operator).")


@tenant_app.command("create")
def tenant_create(
    name: str,
    budget_epsilon: Annotated[
        float, typer.Option(help="Epsilon budget at the budget delta.")
    ] = 10.0,
    budget_delta: Annotated[float, typer.Option(help="Delta at which the budget is kept.")] = 1e-5,
) -> None:
    """Create a tenant and print its first admin key (shown once)."""
    from privacy.budget import BudgetError, check_epsilon_budget
    from tenancy.db import session_scope
    from tenancy.errors import TenancyError
    from tenancy.tenants import Scope, create_api_key, create_tenant

    try:
        check_epsilon_budget(budget_epsilon, max_epsilon=settings().max_budget_epsilon)
    except BudgetError as exc:
        raise UserError(str(exc)) from None
    platform = open_platform()
    try:
        with session_scope(platform.engine) as session:
            tenant = create_tenant(
                session=session,
                keyring=platform.keyring,
                name=name,
                budget_epsilon=budget_epsilon,
                budget_delta=budget_delta,
            )
            _, secret = create_api_key(session=session, tenant=tenant, scopes=[Scope.admin])
    except TenancyError as exc:
        raise UserError(str(exc)) from None
    console.print(f"Tenant {name} created (id {tenant.id}).")
    console.print(f"Admin key (shown once): {secret}")


@tenant_app.command("list")
def tenant_list() -> None:
    """List tenants with their budgets."""
    from tenancy.tenants import list_tenants

    platform = open_platform()
    table = Table("name", "id", "budget epsilon", "budget delta", "created")
    from sqlmodel import Session

    with Session(platform.engine) as session:
        for t in list_tenants(session=session):
            table.add_row(
                t.name, t.id, f"{t.budget_epsilon:g}", f"{t.budget_delta:g}", str(t.created_at)
            )
    console.print(table)


@tenant_app.command("budget")
def tenant_budget(
    name: str,
    epsilon: Annotated[float, typer.Option(help="The new epsilon budget (at the tenant's delta).")],
    reason: Annotated[str, typer.Option(help="Why; kept in the budget chain.")],
    dataset: Annotated[
        str | None, typer.Option(help="Budget one dataset on its own (default: whole tenant).")
    ] = None,
) -> None:
    """Raise (or lower) a tenant's epsilon budget; the change is recorded and hash-chained."""
    from privacy.budget import BudgetError, change_budget
    from privacy.ledger import TENANT_WIDE
    from tenancy.db import session_scope
    from tenancy.errors import NotFound
    from tenancy.tenants import get_tenant

    if not reason.strip():
        raise UserError("Give a --reason for the budget change; it is kept in the record.")
    platform = open_platform()
    try:
        with session_scope(platform.engine) as session:
            row = get_tenant(session=session, name=name)
            change = change_budget(
                session,
                tenant=row,
                new_epsilon=epsilon,
                actor=f"operator {os.environ.get('USER', 'cli')}",
                reason=reason,
                dataset=dataset or TENANT_WIDE,
                max_epsilon=settings().max_budget_epsilon,
            )
    except (NotFound, BudgetError) as exc:
        raise UserError(str(exc)) from None
    scope = "tenant" if change.dataset == TENANT_WIDE else f"dataset {change.dataset}"
    old = "none" if change.old_epsilon is None else f"{change.old_epsilon:g}"
    console.print(
        f"Budget of {name} ({scope}) set from {old} to {change.new_epsilon:g} at delta "
        f"{change.delta:g}; recorded as budget change {change.seq}."
    )


@tenant_app.command("delete")
def tenant_delete(
    name: str,
    yes: Annotated[bool, typer.Option("--yes", help="Confirm: this cannot be undone.")] = False,
) -> None:
    """Crypto-shred a tenant: data key destroyed, blobs removed, keys revoked; ledger kept."""
    from tenancy.errors import TenancyError
    from tenancy.rotation import delete_tenant
    from tenancy.tenants import get_tenant

    if not yes:
        raise UserError(f"Deleting {name} destroys its models for good; repeat with --yes.")
    platform = open_platform()
    try:
        from sqlmodel import Session

        with Session(platform.engine) as session:
            tenant_id = get_tenant(session=session, name=name).id
        done = delete_tenant(platform.engine, platform.keyring, platform.store, tenant_id=tenant_id)
    except TenancyError as exc:
        raise UserError(str(exc)) from None
    from orchestration.worker import sweep_scratch

    # Scratch files (vectors of tenants' text) of ended runs that a killed worker left.
    sweep_scratch(platform.engine, settings().data_dir / "scratch")
    console.print(
        f"Tenant {name} deleted: {done.destroyed_data_keys} data key(s) destroyed, "
        f"{done.removed_blobs} blob(s) removed, {done.revoked_keys} key(s) revoked; "
        f"its privacy ledger is kept for auditors (tenant id {done.tenant_id})."
    )
