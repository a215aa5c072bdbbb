"""The `fedtext` command line."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from sqlmodel import Session, select

from fedtext.settings import Settings

app = typer.Typer(no_args_is_help=True, help="Federated, differentially private text classifiers.")
tenant_app = typer.Typer(no_args_is_help=True, help="Create and list tenants (operator).")
keys_app = typer.Typer(no_args_is_help=True, help="API keys of a tenant.")
audit_app = typer.Typer(no_args_is_help=True, help="Privacy ledger checks for auditors.")
db_app = typer.Typer(no_args_is_help=True, help="Database schema.")
app.add_typer(tenant_app, name="tenant")
app.add_typer(keys_app, name="keys")
app.add_typer(audit_app, name="audit")
app.add_typer(db_app, name="db")

console = Console(soft_wrap=True)  # never wrap a key or an error across lines
err = Console(stderr=True, soft_wrap=True)


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        raise _fail("; ".join(e["msg"] for e in exc.errors())) from None


def _platform(settings: Settings):  # type: ignore[no-untyped-def]
    from fedtext.platform import platform_from_settings, upgrade_schema

    platform = platform_from_settings(settings)
    upgrade_schema(platform)
    return platform


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create the platform's tables where they are missing."""
    settings = _settings()
    _platform(settings)
    console.print(f"Schema is up to date at {settings.resolved_database_url}")


@tenant_app.command("create")
def tenant_create(
    name: str,
    budget_epsilon: Annotated[
        float, typer.Option(help="Epsilon budget at the budget delta.")
    ] = 10.0,
    budget_delta: Annotated[float, typer.Option(help="Delta at which the budget is kept.")] = 1e-5,
) -> None:
    """Create a tenant and print its first admin key (shown once)."""
    from tenancy.db import session_scope
    from tenancy.errors import TenancyError
    from tenancy.tenants import Scope, create_api_key, create_tenant

    platform = _platform(_settings())
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
        raise _fail(str(exc)) from None
    console.print(f"Tenant {name} created (id {tenant.id}).")
    console.print(f"Admin key (shown once): {secret}")


@tenant_app.command("list")
def tenant_list() -> None:
    """List tenants with their budgets."""
    from tenancy.tenants import list_tenants

    platform = _platform(_settings())
    table = Table("name", "id", "budget epsilon", "budget delta", "created")
    with Session(platform.engine) as session:
        for t in list_tenants(session=session):
            table.add_row(
                t.name, t.id, f"{t.budget_epsilon:g}", f"{t.budget_delta:g}", str(t.created_at)
            )
    console.print(table)


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant name.")],
    scopes: Annotated[str, typer.Option(help="Comma-separated: admin, predict.")] = "predict",
    name: Annotated[str, typer.Option(help="A label for the key.")] = "",
) -> None:
    """Create an API key for a tenant (printed once)."""
    from tenancy.db import session_scope
    from tenancy.errors import TenancyError
    from tenancy.tenants import create_api_key, get_tenant

    platform = _platform(_settings())
    try:
        with session_scope(platform.engine) as session:
            row = get_tenant(session=session, name=tenant)
            key, secret = create_api_key(session=session, tenant=row, scopes=scopes, name=name)
    except TenancyError as exc:
        raise _fail(str(exc)) from None
    console.print(f"Key {key.prefix} ({key.scopes}) for {tenant} (shown once): {secret}")


@audit_app.command("verify")
def audit_verify() -> None:
    """Check every tenant's hash chain; exit 1 naming the first broken entry."""
    from privacy.ledger import PrivacyEvent, tenant_events, verify_chain

    platform = _platform(_settings())
    with Session(platform.engine) as session:
        tenant_ids = sorted(set(session.exec(select(PrivacyEvent.tenant_id)).all()))
        problems = []
        total = 0
        for tenant_id in tenant_ids:
            events = tenant_events(session, tenant_id)
            total += len(events)
            problem = verify_chain(events)
            if problem:
                problems.append(problem)
    if problems:
        for p in problems:
            err.print(f"[red]BROKEN[/red] tenant {p.tenant_id} entry {p.seq}: {p.reason}")
        raise typer.Exit(1)
    console.print(f"OK: {len(tenant_ids)} chain(s), {total} entries intact.")


@app.command()
def simulate(
    tenants: Annotated[int, typer.Option(help="Number of simulated tenants (one node each).")] = 3,
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 3,
    epsilon: Annotated[float, typer.Option(help="Target epsilon per tenant for the run.")] = 3.0,
    local_epochs: Annotated[int, typer.Option(help="Local epochs per round.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Expected (Poisson) batch size.")] = 64,
    learning_rate: Annotated[float, typer.Option(help="SGD learning rate.")] = 0.5,
    clip_norm: Annotated[float, typer.Option(help="Per-example clipping norm.")] = 1.0,
    max_train_examples: Annotated[int, typer.Option(help="Cap per tenant (0: no cap).")] = 3000,
    max_test_examples: Annotated[int, typer.Option(help="Cap per tenant (0: no cap).")] = 600,
    prefix: Annotated[str, typer.Option(help="Tenant names are PREFIX-1..N.")] = "sim",
    insecure: Annotated[bool, typer.Option(help="Turn secure_mode off (tests only).")] = False,
) -> None:
    """Run a simulated federation on the demo corpus; missing tenants are created."""
    from fedtext.simulation import SimulationFailed
    from fedtext.simulation import simulate as run_sim
    from tenancy.db import session_scope
    from tenancy.errors import NotFound
    from tenancy.tenants import check_name, create_tenant, get_tenant

    if tenants < 2:
        raise _fail("--tenants should be at least 2.")
    names = [f"{prefix}-{i}" for i in range(1, tenants + 1)]
    try:
        for n in names:
            check_name(n)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    platform = _platform(_settings())
    with session_scope(platform.engine) as session:
        for n in names:
            try:
                get_tenant(session=session, name=n)
            except NotFound:
                create_tenant(session=session, keyring=platform.keyring, name=n)
                console.print(f"created tenant {n}")
    logging.basicConfig(level=logging.WARNING)
    try:
        result = run_sim(
            platform,
            tenants=names,
            rounds=rounds,
            epsilon=epsilon,
            local_epochs=local_epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            clip_norm=clip_norm,
            max_train_examples=max_train_examples,
            max_test_examples=max_test_examples,
            secure_mode=not insecure,
        )
    except (SimulationFailed, ValueError) as exc:
        raise _fail(str(exc), code=1) from None
    table = Table(
        "tenant", "train", "test", "accuracy", "macro-F1", "run epsilon", "noise", "version"
    )
    for name, t in result.summary["tenants"].items():
        table.add_row(
            name,
            str(t["train_examples"]),
            str(t["test_examples"]),
            f"{t['accuracy']:.3f}" if t["accuracy"] is not None else "n/a",
            f"{t['macro_f1']:.3f}" if t["macro_f1"] is not None else "n/a",
            f"{t['run_epsilon']:.3f}",
            f"{t['noise_multiplier']:.3f}",
            f"{t['model']} v{t['version']}",
        )
    console.print(f"Run {result.run_id} completed.")
    console.print(table)
    for reason in result.summary.get("refused", []):
        console.print(f"[yellow]refused:[/yellow] {reason}")


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    port: Annotated[int | None, typer.Option(help="Port.")] = None,
) -> None:
    """Serve the HTTP API (predictions, keys, models, privacy)."""
    import uvicorn

    from serving.app import create_app
    from serving.config import ServingConfig

    settings = _settings()
    if settings.operator_token is None:
        if not settings.dev_mode:
            raise _fail(
                "Set FEDTEXT_OPERATOR_TOKEN (32+ random characters), or FEDTEXT_DEV_MODE=1."
            )
        token = secrets.token_urlsafe(32)
        console.print(f"dev mode: operator token for this process: {token}")
    else:
        token = settings.operator_token
    app_ = create_app(
        _platform(settings),
        ServingConfig(
            operator_token=token,
            max_predict_inputs=settings.max_predict_inputs,
            max_input_chars=settings.max_input_chars,
        ),
    )
    uvicorn.run(app_, host=host or settings.api_host, port=port or settings.api_port)


@app.command()
def demo(
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 3,
    epsilon: Annotated[float, typer.Option(help="Target epsilon per tenant.")] = 4.0,
    max_train_examples: Annotated[int, typer.Option(help="Training examples per tenant.")] = 3000,
    max_test_examples: Annotated[int, typer.Option(help="Test examples per tenant.")] = 600,
    data_dir: Annotated[Path | None, typer.Option(help="Default: FEDTEXT_DATA_DIR/demo.")] = None,
    insecure: Annotated[bool, typer.Option(help="Turn secure_mode off (tests only).")] = False,
) -> None:
    """Three tenants, a DP federation, encrypted models, predictions over HTTP."""
    from fedtext.demo import print_report, run_demo

    target = data_dir or (_settings().data_dir / "demo")
    report = run_demo(
        target,
        rounds=rounds,
        epsilon=epsilon,
        max_train_examples=max_train_examples,
        max_test_examples=max_test_examples,
        secure_mode=not insecure,
        console=console,
    )
    print_report(report, console)
    if report.plaintext_files:
        raise _fail(f"plaintext weights found: {report.plaintext_files}", code=1)


def main() -> None:  # pragma: no cover - console entry
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
