"""`fedtext policy ...`: a tenant's own governance, set by the operator (its admin uses
GET/PUT /v1/policy): deploy policy for versions made by any run it joins, floor for run
settings, and the dataset its simulated runs charge."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from fedtext.cli.console import UserError, console, group, open_platform

policy_app = group("A tenant's deploy policy, floor for run settings and dataset (operator).")


def _show(name: str, policy: object) -> None:
    from tenancy.governance import Policy

    assert isinstance(policy, Policy)
    if not policy.signed:
        console.print(
            f"[red]{name}: the stored policy is not signed by the platform[/red] (changed "
            "around it; `fedtext audit verify` names it). It is not applied; the strictest "
            "is, and every run including this tenant is refused until `fedtext policy set` "
            "sets it again (from the defaults). Applied now:"
        )
    console.print(
        f"{name}: deploy {policy.deploy}; secure mode "
        f"{'required' if policy.require_secure_mode else 'not required'}; largest epsilon "
        f"per run {'any' if policy.max_epsilon is None else f'{policy.max_epsilon:g}'}; "
        f"families {', '.join(policy.families) or 'any'}; dataset {policy.dataset}"
    )


@policy_app.command("show")
def policy_show(name: str) -> None:
    """Print a tenant's policy."""
    from sqlmodel import Session  # SQL: loaded by the command, not by --help

    from tenancy.errors import NotFound
    from tenancy.governance import get_policy
    from tenancy.tenants import get_tenant

    platform = open_platform()
    with Session(platform.engine) as session:
        try:
            tenant = get_tenant(session=session, name=name)
        except NotFound as exc:
            raise UserError(str(exc)) from None
        _show(name, get_policy(session=session, tenant_id=tenant.id))


@policy_app.command("set")
def policy_set(
    name: str,
    deploy: Annotated[
        str | None,
        typer.Option(help="always, if-better, first or never (the stricter of it and a run's)."),
    ] = None,
    require_secure_mode: Annotated[
        bool | None,
        typer.Option("--require-secure-mode/--allow-insecure", help="Refuse runs without it."),
    ] = None,
    max_epsilon: Annotated[
        float | None, typer.Option(help="Largest target epsilon per run.")
    ] = None,
    any_epsilon: Annotated[bool, typer.Option(help="Lift the largest epsilon.")] = False,
    families: Annotated[
        str | None, typer.Option(help="Allowed model families, comma-separated; '' for any.")
    ] = None,
    dataset: Annotated[
        str | None, typer.Option(help="The dataset the tenant's simulated runs charge.")
    ] = None,
) -> None:
    """Change parts of a tenant's policy (the others keep their value)."""
    from serving.protocols.v1.policy import check_policy_names
    from tenancy.db import session_scope
    from tenancy.errors import InvalidInput, NotFound
    from tenancy.governance import set_policy
    from tenancy.tenants import get_tenant

    names = None if families is None else [f for f in families.split(",") if f.strip()]
    platform = open_platform()
    try:
        check_policy_names(family_names=names, dataset=dataset)
        with session_scope(platform.engine) as session:
            tenant = get_tenant(session=session, name=name)
            policy = set_policy(
                session=session,
                tenant_id=tenant.id,
                actor=f"operator {os.environ.get('USER', 'cli')}",
                deploy=deploy.strip().lower() if deploy else None,
                require_secure_mode=require_secure_mode,
                max_epsilon=max_epsilon,
                clear_max_epsilon=any_epsilon,
                families=names,
                dataset=dataset,
            )
    except (NotFound, InvalidInput) as exc:
        raise UserError(str(exc)) from None
    _show(name, policy)
