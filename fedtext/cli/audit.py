"""`fedtext audit ...`: the privacy ledger's checks, reports and exports for auditors."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedtext.cli.console import UserError, console, err, fail, group, open_platform

audit_app = group("Privacy ledger checks for auditors.")


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
            raise UserError(f"Cannot read {head}: {exc.strerror}.") from None
        except HeadError as exc:
            raise UserError(str(exc)) from None
    platform = open_platform()
    problems: list[str] = []
    total = changes = 0
    trusted = platform_key_ids(platform.keyring, platform.keyring.provider.versions())
    from sqlmodel import Session

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
        raise UserError(f"Unknown report format {fmt!r}; use html or json.")
    platform = open_platform()
    from sqlmodel import Session

    with Session(platform.engine) as session:
        try:
            row = get_tenant(session=session, name=tenant)
        except NotFound as exc:
            raise UserError(str(exc)) from None
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
            raise UserError(f"Cannot write {out}: {exc.strerror}.") from None
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
        raise UserError(f"Unknown export format {format!r}; use jsonl or csv.")
    platform = open_platform()
    from sqlmodel import Session

    with Session(platform.engine) as session:
        if tenant is None:
            ids = all_tenant_ids(session)
        else:
            try:
                ids = [get_tenant(session=session, name=tenant).id]
            except NotFound as exc:
                raise UserError(str(exc)) from None
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
        raise UserError(f"Cannot write {out}: {exc.strerror}.") from None
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
        raise UserError(str(exc)) from None
    except (SimulationFailed, RuntimeError) as exc:
        raise fail(f"the canary federation failed: {exc}", code=1) from None
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
