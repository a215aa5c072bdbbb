"""The `fedtext` command line."""

from __future__ import annotations

import gc
import logging
import os
import secrets
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from sqlmodel import Session

from fedtext.deploy_cli import federation_app
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
app.add_typer(federation_app, name="federation")

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
        raise _fail("Give a --reason for the budget change; it is kept in the record.")
    platform = _platform(_settings())
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
            )
    except (NotFound, BudgetError) as exc:
        raise _fail(str(exc)) from None
    scope = "tenant" if change.dataset == TENANT_WIDE else f"dataset {change.dataset}"
    old = "none" if change.old_epsilon is None else f"{change.old_epsilon:g}"
    console.print(
        f"Budget of {name} ({scope}) set from {old} to {change.new_epsilon:g} at delta "
        f"{change.delta:g}; recorded as budget change {change.seq}."
    )


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


@keys_app.command("list")
def keys_list(tenant: Annotated[str, typer.Option(help="Tenant name.")]) -> None:
    """List a tenant's API keys (prefixes and scopes; never secrets)."""
    from sqlmodel import col, select

    from tenancy.errors import TenancyError
    from tenancy.tables import ApiKey
    from tenancy.tenants import get_tenant

    platform = _platform(_settings())
    table = Table("prefix", "scopes", "name", "created", "expires", "revoked")
    try:
        with Session(platform.engine) as session:
            row = get_tenant(session=session, name=tenant)
            for k in session.exec(
                select(ApiKey).where(ApiKey.tenant_id == row.id).order_by(col(ApiKey.created_at))
            ):
                table.add_row(
                    k.prefix, k.scopes, k.name, str(k.created_at), str(k.expires_at or ""),
                    str(k.revoked_at or ""),
                )  # fmt: skip
    except TenancyError as exc:
        raise _fail(str(exc)) from None
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(prefix: Annotated[str, typer.Argument(help="The key's prefix.")]) -> None:
    """Revoke an API key at once (by its prefix)."""
    from sqlmodel import select

    from tenancy.db import session_scope
    from tenancy.tables import ApiKey, utcnow

    platform = _platform(_settings())
    with session_scope(platform.engine) as session:
        key = session.exec(select(ApiKey).where(ApiKey.prefix == prefix)).first()
        if key is None:
            raise _fail(f"No key with prefix {prefix!r}.")
        if key.revoked_at is None:
            key.revoked_at = utcnow()
            session.add(key)
    console.print(f"Key {prefix} revoked.")


@keys_app.command("rotate-kek")
def keys_rotate_kek(
    grace: Annotated[
        float, typer.Option(help="Seconds before unused old KEK versions are retired.")
    ] = 1.0,
) -> None:
    """New key-encryption key version; every data key rewrapped; unused old versions retired."""
    from tenancy.errors import TenancyError
    from tenancy.rotation import rotate_kek

    platform = _platform(_settings())
    try:
        done = rotate_kek(platform.engine, platform.keyring, grace_seconds=grace)
    except TenancyError as exc:
        raise _fail(str(exc)) from None
    kept = ", ".join(map(str, done.kept)) or "none"
    retired = ", ".join(map(str, done.retired)) or "none"
    console.print(
        f"KEK version {done.new_version} is current; {done.rewrapped} data key(s) rewrapped; "
        f"retired: {retired}; kept (still used by run checkpoints): {kept}."
    )


@keys_app.command("rotate-dek")
def keys_rotate_dek(tenant: Annotated[str, typer.Option(help="Tenant name.")]) -> None:
    """New data key for a tenant; its model blobs re-encrypted; the old data key destroyed."""
    from tenancy.errors import TenancyError
    from tenancy.rotation import rotate_dek

    platform = _platform(_settings())
    try:
        done = rotate_dek(platform.engine, platform.keyring, platform.store, tenant=tenant)
    except TenancyError as exc:
        raise _fail(str(exc)) from None
    console.print(
        f"Tenant {tenant}: new data key; {done.reencrypted} blob(s) re-encrypted; "
        "the old data key is destroyed."
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
        raise _fail(f"Deleting {name} destroys its models for good; repeat with --yes.")
    platform = _platform(_settings())
    try:
        with Session(platform.engine) as session:
            tenant_id = get_tenant(session=session, name=name).id
        done = delete_tenant(platform.engine, platform.keyring, platform.store, tenant_id=tenant_id)
    except TenancyError as exc:
        raise _fail(str(exc)) from None
    console.print(
        f"Tenant {name} deleted: {done.destroyed_data_keys} data key(s) destroyed, "
        f"{done.removed_blobs} blob(s) removed, {done.revoked_keys} key(s) revoked; "
        f"its privacy ledger is kept for auditors (tenant id {done.tenant_id})."
    )


@audit_app.command("verify")
def audit_verify(
    head: Annotated[
        Path | None,
        typer.Option(
            help="A signed head kept earlier (heads file, head or JSON report): check that "
            "the database still holds that history and those budgets."
        ),
    ] = None,
) -> None:
    """Check every tenant's chains, budgets and last signed head; exit 1 naming each problem.

    With --head, also check the database against heads the auditor kept: this detects a
    deleted tail, a tenant's whole chain deleted, a budget edited outside the record and
    a chain rewritten and re-hashed.
    """
    from privacy.heads import HeadError, last_signed_head, platform_key_ids, read_heads, verify_head
    from privacy.ledger import all_tenant_ids, budget_changes, tenant_events, verify_chain
    from tenancy.tables import Tenant

    kept = []
    if head is not None:
        try:
            kept = read_heads(head.read_text(encoding="utf-8"))
        except OSError as exc:
            raise _fail(f"Cannot read {head}: {exc.strerror}.") from None
        except HeadError as exc:
            raise _fail(str(exc)) from None
    platform = _platform(_settings())
    problems: list[str] = []
    total = changes = 0
    trusted = platform_key_ids(platform.keyring, platform.keyring.provider.versions())
    with Session(platform.engine) as session:
        tenant_ids = sorted(set(all_tenant_ids(session)) | {h.head.tenant_id for h in kept})
        for tenant_id in tenant_ids:
            events = tenant_events(session, tenant_id)
            total += len(events)
            problem = verify_chain(events)
            if problem:
                problems.append(f"tenant {tenant_id} entry {problem.seq}: {problem.reason}")
            budget = budget_changes(session, tenant_id)
            changes += len(budget)
            problem = verify_chain(budget)
            if problem:
                problems.append(f"tenant {tenant_id} budget change {problem.seq}: {problem.reason}")
            row = session.get(Tenant, tenant_id)
            eps = row.budget_epsilon if row else None
            delta = row.budget_delta if row else None
            checks = [h for h in kept if h.head.tenant_id == tenant_id]
            stored = last_signed_head(session, tenant_id)
            for signed in [*checks, *([stored] if stored else [])]:
                problems += [
                    f"tenant {tenant_id}: {p}"
                    for p in verify_head(
                        signed,
                        events=events,
                        changes=budget,
                        budget_epsilon=eps,
                        budget_delta=delta,
                        trusted_keys=trusted,
                    )
                ]
            wide = [c for c in budget if c.dataset == "*"]
            if row is not None and wide and abs(wide[-1].new_epsilon - row.budget_epsilon) > 1e-12:
                problems.append(
                    f"tenant {tenant_id}: budget in force {row.budget_epsilon:g} differs from "
                    f"its budget chain ({wide[-1].new_epsilon:g})"
                )
    if problems:
        for p in dict.fromkeys(problems):  # the stored and the kept head may agree
            err.print(f"[red]BROKEN[/red] {p}")
        raise typer.Exit(1)
    console.print(
        f"OK: {len(tenant_ids)} chain(s), {total} entries intact; "
        f"{changes} budget change(s) intact"
        + (f"; {len(kept)} kept head(s) consistent." if kept else ".")
    )


@audit_app.command("report")
def audit_report(
    tenant: Annotated[str, typer.Option(help="Tenant name.")],
    out: Annotated[Path, typer.Option(help="File to write; '-' for standard output.")],
    format: Annotated[
        str | None, typer.Option(help="html or json (default: from the file extension, else html).")
    ] = None,
) -> None:
    """Write a tenant's audit report (budget, runs, rounds, chain check, methodology)."""
    from privacy.report import render, signed_report
    from tenancy.errors import NotFound
    from tenancy.tenants import get_tenant

    fmt = (format or ("json" if out.suffix.lower() == ".json" else "html")).lower()
    if fmt not in ("html", "json"):
        raise _fail(f"Unknown report format {fmt!r}; use html or json.")
    platform = _platform(_settings())
    with Session(platform.engine) as session:
        try:
            row = get_tenant(session=session, name=tenant)
        except NotFound as exc:
            raise _fail(str(exc)) from None
        report = signed_report(
            session,
            platform.keyring,
            platform.keyring.provider.versions(),
            tenant_id=row.id,
            tenant_name=row.name,
            budget_epsilon=row.budget_epsilon,
            delta=row.budget_delta,
        )
        session.commit()
    text = render(report, fmt)  # type: ignore[arg-type]
    if str(out) == "-":
        console.out(text, end="", highlight=False)
    else:
        try:
            out.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise _fail(f"Cannot write {out}: {exc.strerror}.") from None
        console.print(
            f"Report for {tenant} written to {out}: spent {report.spent_epsilon:.4f} of "
            f"{report.budget_epsilon:g} (PRV), independent {report.independent.epsilon:.4f}, "
            f"chains {'intact' if report.chain_ok else 'BROKEN'}."
        )
    if not report.chain_ok:
        raise typer.Exit(1)


@audit_app.command("export")
def audit_export(
    out: Annotated[Path, typer.Option(help="File to write; '-' for standard output.")],
    tenant: Annotated[str | None, typer.Option(help="One tenant (default: all).")] = None,
    format: Annotated[str, typer.Option(help="jsonl or csv.")] = "jsonl",
) -> None:
    """Export the ledger for an auditor (see docs/AUDIT.md), with a signed head per tenant
    in OUT.heads.json (keep it: `fedtext audit verify --head OUT.heads.json`)."""
    from privacy.export import export_text
    from privacy.heads import heads_file, platform_signer, sign_and_store
    from privacy.ledger import all_tenant_ids, tenant_events
    from tenancy.errors import NotFound
    from tenancy.tables import Tenant
    from tenancy.tenants import get_tenant

    if format not in ("jsonl", "csv"):
        raise _fail(f"Unknown export format {format!r}; use jsonl or csv.")
    platform = _platform(_settings())
    with Session(platform.engine) as session:
        if tenant is None:
            ids = all_tenant_ids(session)
        else:
            try:
                ids = [get_tenant(session=session, name=tenant).id]
            except NotFound as exc:
                raise _fail(str(exc)) from None
        events = [ev for tid in ids for ev in tenant_events(session, tid)]
        signer = platform_signer(platform.keyring)
        heads = []
        for tid in ids:
            row = session.get(Tenant, tid)
            if row is not None:  # a deleted tenant's ledger is exported without a budget
                heads.append(
                    sign_and_store(
                        session,
                        signer,
                        tenant_id=tid,
                        budget_epsilon=row.budget_epsilon,
                        budget_delta=row.budget_delta,
                    )
                )
        body = export_text(events, format)  # type: ignore[arg-type]
        session.commit()
    if str(out) == "-":
        console.out(body, end="", highlight=False)
        return
    head_path = out.with_name(out.name + ".heads.json")
    try:
        out.write_text(body, encoding="utf-8")
        head_path.write_text(heads_file(heads), encoding="utf-8")
    except OSError as exc:
        raise _fail(f"Cannot write {out}: {exc.strerror}.") from None
    console.print(
        f"{len(events)} entries of {len(ids)} tenant(s) written to {out}; "
        f"signed heads in {head_path} (keep it)."
    )


@audit_app.command("canary")
def audit_canary(
    canaries: Annotated[int, typer.Option(help="Canaries m; each is a member w.p. 1/2.")] = 64,
    tenants: Annotated[int, typer.Option(help="Simulated tenants (canaries go to the first).")] = 2,
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 2,
    epsilon: Annotated[float, typer.Option(help="Target epsilon per tenant for the run.")] = 4.0,
    max_train_examples: Annotated[int, typer.Option(help="Demo examples per tenant.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Expected (Poisson) batch size.")] = 32,
    learning_rate: Annotated[float, typer.Option(help="Client Adam learning rate.")] = 0.01,
    guesses: Annotated[
        int | None, typer.Option(help="Canaries the attack guesses on (default m/2).")
    ] = None,
    confidence: Annotated[float, typer.Option(help="Confidence of the lower bound.")] = 0.95,
    seed: Annotated[int | None, typer.Option(help="Canary seed (default: random).")] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Keep the scratch platform here (reset first).")
    ] = None,
    insecure: Annotated[bool, typer.Option(help="Turn secure_mode off (tests only).")] = False,
) -> None:
    """Train with canaries, attack the model, compare the empirical bound with accounting.

    Exits 1 if the empirical lower bound on epsilon exceeds the accounted epsilon.
    """
    from fedtext.audit_canary import run_canary_audit
    from runs.simulation import SimulationFailed

    logging.basicConfig(level=logging.WARNING)
    try:
        report = run_canary_audit(
            data_dir=data_dir,
            tenants=tenants,
            rounds=rounds,
            epsilon=epsilon,
            canaries=canaries,
            max_train_examples=max_train_examples,
            batch_size=batch_size,
            learning_rate=learning_rate,
            guesses=guesses,
            confidence=confidence,
            seed=seed,
            secure_mode=not insecure,
        )
    except ValueError as exc:
        raise _fail(str(exc)) from None
    except (SimulationFailed, RuntimeError) as exc:
        raise _fail(f"the canary federation failed: {exc}", code=1) from None
    o = report.outcome
    table = Table("figure", "value", title=f"canary audit of tenant {report.tenant}")
    table.add_row("run", report.run_id)
    table.add_row("canaries (members)", f"{o.canaries} ({o.members})")
    table.add_row("guesses, correct", f"{o.guesses}, {o.correct}")
    table.add_row("mean loss members / non-members",
                  f"{report.member_mean_loss:.4f} / {report.nonmember_mean_loss:.4f}")  # fmt: skip
    table.add_row(
        f"empirical epsilon lower bound ({o.confidence:.0%})", f"{report.lower_bound:.4f}"
    )
    table.add_row(f"accounted epsilon (PRV) at delta {report.delta:g}",
                  f"{report.accounted_epsilon:.4f}")  # fmt: skip
    table.add_row("accounted epsilon (RDP)", f"{report.accounted_epsilon_rdp:.4f}")
    table.add_row("seconds", f"{report.seconds:.0f}")
    console.print(table)
    if not report.passed:
        err.print(
            f"[red]FAIL:[/red] the empirical lower bound {report.lower_bound:.4f} exceeds the "
            f"accounted epsilon {report.accounted_epsilon:.4f}: the DP training or its "
            f"accounting is broken (seed {report.seed}, run {report.run_id})."
        )
        raise typer.Exit(1)
    console.print(
        f"OK: lower bound {report.lower_bound:.4f} <= accounted {report.accounted_epsilon:.4f}."
    )


@app.command()
def simulate(
    tenants: Annotated[int, typer.Option(help="Number of simulated tenants (one node each).")] = 3,
    rounds: Annotated[
        int | None, typer.Option(help="Federated rounds [default: the family's]")
    ] = None,
    epsilon: Annotated[float, typer.Option(help="Target epsilon per tenant for the run.")] = 3.0,
    model: Annotated[
        str,
        typer.Option(
            help="encoder-head (frozen public encoder + DP head), lstm, transformer or minilm."
        ),
    ] = "encoder-head",
    strategy: Annotated[str, typer.Option(help="fedavg, fedprox or fedadam.")] = "fedavg",
    partitioning: Annotated[str, typer.Option(help="iid, dirichlet or topic.")] = "iid",
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration (label skew).")] = 0.5,
    local_epochs: Annotated[
        int | None, typer.Option(help="Local epochs per round [default: the family's]")
    ] = None,
    personalize_epochs: Annotated[
        int | None, typer.Option(help="DP fine-tune epochs; 0: off [default: the family's]")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            help="Expected (Poisson) batch; 0: a tenth of each tenant's data "
            "[default: the family's]"
        ),
    ] = None,
    learning_rate: Annotated[
        float | None, typer.Option(help="Client Adam learning rate [default: the family's]")
    ] = None,
    clip_norm: Annotated[float, typer.Option(help="Per-example clipping norm.")] = 1.0,
    fraction_train: Annotated[float, typer.Option(help="Share of tenants per round.")] = 1.0,
    min_nodes: Annotated[int, typer.Option(help="Valid replies a round needs.")] = 2,
    client_dp_noise: Annotated[
        float, typer.Option(help="Client-level DP noise (Flower wrapper); 0: off.")
    ] = 0.0,
    client_dp_clip: Annotated[float, typer.Option(help="Client-level update clip.")] = 10.0,
    max_train_examples: Annotated[int, typer.Option(help="Cap per tenant (0: no cap).")] = 3000,
    max_test_examples: Annotated[int, typer.Option(help="Cap per tenant (0: no cap).")] = 600,
    gpu_fraction: Annotated[float, typer.Option(help="GPU share per virtual client.")] = 0.0,
    prefix: Annotated[str, typer.Option(help="Tenant names are PREFIX-1..N.")] = "sim",
    resume: Annotated[
        str | None, typer.Option(help="Continue run RUN_ID from its last checkpoint.")
    ] = None,
    insecure: Annotated[bool, typer.Option(help="Turn secure_mode off (tests only).")] = False,
) -> None:
    """Run a simulated federation on the demo corpus; missing tenants are created."""
    from fedtext.progress import watch_run
    from runs.simulation import SimulationConfig, SimulationFailed
    from runs.simulation import resume as resume_run
    from runs.simulation import simulate as run_sim
    from tenancy.db import session_scope
    from tenancy.errors import NotFound
    from tenancy.tenants import check_name, create_tenant, get_tenant

    platform = _platform(_settings())
    logging.basicConfig(level=logging.WARNING)
    run_id = resume or uuid.uuid4().hex
    try:
        if resume:
            result = watch_run(platform, run_id, lambda: resume_run(platform, run_id), console)
        else:
            if tenants < 2:
                raise _fail("--tenants should be at least 2.")
            names = [f"{prefix}-{i}" for i in range(1, tenants + 1)]
            for n in names:
                check_name(n)
            config = SimulationConfig(
                tenants=names,
                rounds=rounds,
                epsilon=epsilon,
                model=model,
                strategy=strategy,
                partitioning=partitioning,
                alpha=alpha,
                local_epochs=local_epochs,
                personalize_epochs=personalize_epochs,
                batch_size=batch_size,
                learning_rate=learning_rate,
                clip_norm=clip_norm,
                fraction_train=fraction_train,
                min_nodes=min_nodes,
                client_dp_noise=client_dp_noise,
                client_dp_clip=client_dp_clip,
                max_train_examples=max_train_examples,
                max_test_examples=max_test_examples,
                gpu_fraction=gpu_fraction,
                secure_mode=not insecure,
            )
            _validate_simulation(config)
            with session_scope(platform.engine) as session:
                for n in names:
                    try:
                        get_tenant(session=session, name=n)
                    except NotFound:
                        create_tenant(session=session, keyring=platform.keyring, name=n)
                        console.print(f"created tenant {n}")
            result = watch_run(platform, run_id, lambda: run_sim(platform, config, run_id), console)
    except (SimulationFailed, ValueError) as exc:
        raise _fail(str(exc), code=1) from None
    table = Table(
        "tenant", "train", "test", "global acc", "global F1", "personal acc", "personal F1",
        "run epsilon", "noise", "version",
    )  # fmt: skip
    for name, t in result.summary["tenants"].items():
        table.add_row(
            name,
            str(t["train_examples"]),
            str(t["test_examples"]),
            _num(t["global_accuracy"]),
            _num(t["global_macro_f1"]),
            _num(t["personalized_accuracy"]),
            _num(t["personalized_macro_f1"]),
            f"{t['run_epsilon']:.3f}",
            f"{t['noise_multiplier']:.3f}",
            f"{t['model']} v{t['version']}",
        )
    console.print(f"Run {result.run_id} completed.")
    console.print(table)
    for key in ("refused", "failed", "rejected"):
        for reason in result.summary.get(key, []):
            console.print(f"[yellow]{key}:[/yellow] {reason}")
    if "client_level_dp" in result.summary:
        c = result.summary["client_level_dp"]
        console.print(f"client-level DP: epsilon {c['epsilon']:.3f} at delta {c['delta']:g}")


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _validate_simulation(config: Any) -> None:
    """Refuse bad options before anything starts, with the option's own words."""
    from clients.data import PARTITIONERS
    from models import families
    from server.strategy import strategy_names

    config.validate()
    if config.model not in families():
        raise ValueError(f"Unknown model family {config.model!r}; known: {', '.join(families())}.")
    if config.strategy not in strategy_names():
        raise ValueError(
            f"Unknown strategy {config.strategy!r}; known: {', '.join(strategy_names())}."
        )
    if config.partitioning not in PARTITIONERS:
        raise ValueError(
            f"Unknown partitioning {config.partitioning!r}; known: {', '.join(PARTITIONERS)}."
        )
    if config.rounds < 1 or config.epsilon <= 0:
        raise ValueError("--rounds should be positive and --epsilon a positive value.")


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    port: Annotated[int | None, typer.Option(help="Port.")] = None,
) -> None:
    """Serve the HTTP API (predictions, keys, models, privacy, training runs).

    Runs started over HTTP are simulated on this machine, or run on the federation of
    FEDTEXT_SUPERLINK (with FEDTEXT_SUPERLINK_CA) when it is set.
    """
    import uvicorn

    from serving.app import create_app
    from serving.config import ServingConfig, default_inference_threads
    from serving.logs import configure_json_logging

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
    configure_json_logging(settings.log_level)
    from fedtext.deploy_cli import UserError
    from runs.federation import FederationRunLauncher
    from runs.worker import LocalRunLauncher
    from serving.launcher import RunLauncher
    from serving.limits import Limits

    platform = _platform(settings)
    launcher: RunLauncher
    if settings.superlink:
        try:
            launcher = FederationRunLauncher(
                platform, settings.data_dir / "runs", settings.superlink, settings.superlink_ca
            )
        except (UserError, ValueError) as exc:  # a bad address or CA certificate
            raise _fail(f"FEDTEXT_SUPERLINK: {exc}") from None
        console.print(f"training runs go to the SuperLink at {settings.superlink}")
    else:
        launcher = LocalRunLauncher(platform, settings.data_dir / "runs")
    app_ = create_app(
        platform,
        ServingConfig(
            operator_token=token,
            max_predict_inputs=settings.max_predict_inputs,
            max_input_chars=settings.max_input_chars,
            cache_models=settings.serve_cache_models,
            cache_bytes=settings.serve_cache_mb * 2**20,
            max_batch=settings.serve_max_batch,
            max_wait_ms=settings.serve_max_wait_ms,
            inference_threads=settings.serve_inference_threads or default_inference_threads(),
            torch_threads=settings.serve_torch_threads,
            lookup_ttl_s=settings.serve_lookup_ttl_s,
        ),
        limits=Limits(
            max_body_bytes=settings.max_body_bytes,
            rate_per_second=settings.rate_limit_per_second,
            burst=settings.rate_limit_burst,
        ),
        run_launcher=launcher,
    )
    # The startup heap (torch, tokenizer, routes) never becomes garbage: out of the cyclic
    # collector's sight, its full collections stop adding tens of ms to tail latency.
    gc.collect()
    gc.freeze()
    # Our middleware writes one JSON line per request; uvicorn's own access log would repeat it.
    uvicorn.run(
        app_,
        host=host or settings.api_host,
        port=port or settings.api_port,
        log_config=None,
        access_log=False,
    )


@app.command()
def demo(
    rounds: Annotated[
        int | None, typer.Option(help="Federated rounds [default: the family's]")
    ] = None,
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
