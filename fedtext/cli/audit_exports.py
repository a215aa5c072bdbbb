"""`fedtext audit report` and `fedtext audit export`: what an auditor takes away (a tenant's
report, the ledger with signed heads)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedtext.cli.console import (
    UserError,
    console,
    open_platform,
)


def audit_report(
    tenant: Annotated[str, typer.Option(help="Tenant name.")],
    out: Annotated[Path, typer.Option(help="File to write; '-' for standard output.")],
    format: Annotated[
        str | None, typer.Option(help="html or json (default: from the file extension, else html).")
    ] = None,
) -> None:
    """Write a tenant's audit report (budget, runs, rounds, chain check, methodology)."""
    from privacy.report import signed_report
    from privacy.report_html import render
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
