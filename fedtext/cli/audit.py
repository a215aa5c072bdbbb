"""`fedtext audit ...`: the privacy ledger's checks, reports and exports for auditors."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from fedtext.cli.console import (
    UserError,
    console,
    err,
    fail,
    group,
    open_platform,
    write_out,
)

if TYPE_CHECKING:  # imported at run time inside the commands (start-up time)
    from sqlmodel import Session

    from privacy.ledger import BudgetChange, PrivacyEvent
    from tenancy.nodes import NodeKey
    from tenancy.platform import Platform
    from tenancy.signing import SigningHistory
    from tenancy.tables import ApiKey

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
    keys: Annotated[
        Path | None,
        typer.Option(
            help="Signing keys the auditor pinned earlier (`fedtext audit keys --out FILE`): "
            "accept only signatures under those keys and keys they endorsed."
        ),
    ] = None,
) -> None:
    """Check every tenant's chains, signatures, budgets and last signed head; exit 1 naming
    each problem.

    Every ledger entry, budget change and API key row must carry a signature under the
    platform's signing history (or the keys pinned with --keys): a row written around the
    platform (plain SQL, no signing key) is named. With --head, also check the database
    against heads the auditor kept: this detects a deleted tail, a tenant's whole chain
    deleted, a budget edited outside the record and a chain rewritten and re-hashed.
    """
    from privacy.heads import HeadError, last_signed_head, read_heads, verify_head
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
    pinned = _read_pinned_keys(keys) if keys is not None else None
    platform = open_platform()
    problems: list[str] = []
    total = changes = 0
    trusted_keys = _trusted_keys(platform, pinned)
    trusted = list(trusted_keys)
    from sqlmodel import Session

    with Session(platform.engine) as session:
        key_rows = _key_rows_by_tenant(session)
        tenant_ids = sorted(
            set(all_tenant_ids(session)) | {h.head.tenant_id for h in kept} | set(key_rows)
        )
        for tenant_id in tenant_ids:
            events = tenant_events(session, tenant_id)
            total += len(events)
            problem = verify_chain(events)
            if problem:
                problems.append(f"tenant {tenant_id} entry {problem.seq}: {problem.reason}")
            budget = budget_changes(session, tenant_id)
            changes += len(budget)
            problems += _signature_problems(tenant_id, events, budget, key_rows, trusted_keys)
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
        # Consents, policies and model versions (deployment included): signed since v0010.
        from tenancy.signing_audit import governance_problems

        problems += governance_problems(session, trusted_keys)
    if problems:
        for p in dict.fromkeys(problems):  # the stored and the kept head may agree
            err.print(f"[red]BROKEN[/red] {p}")
        raise typer.Exit(1)
    console.print(
        f"OK: {len(tenant_ids)} chain(s), {total} entries intact; "
        f"{changes} budget change(s) intact"
        + (f"; {len(kept)} kept head(s) consistent." if kept else ".")
    )


def _read_pinned_keys(path: Path) -> SigningHistory:
    from tenancy.signing import read_history

    try:
        return read_history(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"Cannot read {path}: {exc.strerror}.") from None
    except ValueError as exc:
        raise UserError(f"{path}: {exc}") from None


def _trusted_keys(platform: Platform, pinned: SigningHistory | None) -> dict[str, bytes]:
    """Key id -> public key accepted for rows and heads: the platform's history from its
    first key, or (pinned) the auditor's keys and whatever they endorse in the history."""
    from tenancy.errors import KeyProviderError
    from tenancy.signing import SigningHistory

    try:
        history = platform.keyring.signing.history(refresh=True)
    except KeyProviderError as exc:
        raise UserError(f"Cannot read the platform's signing keys: {exc}") from None
    if pinned is None:
        return history.trusted()
    roots = pinned.trusted()
    joined = SigningHistory(keys=[*pinned.keys, *history.keys])
    return joined.trusted(roots)


def _key_rows_by_tenant(session: Session) -> dict[str, list[ApiKey | NodeKey]]:
    """Each tenant's API key rows, then its node key enrollments (both signed rows that are
    no chain: each is checked alone; ``_key_table`` tells them apart)."""
    from sqlmodel import col, select

    from tenancy.nodes import NodeKey
    from tenancy.tables import ApiKey

    rows: dict[str, list[ApiKey | NodeKey]] = {}
    for row in session.exec(select(ApiKey).order_by(col(ApiKey.created_at))):
        rows.setdefault(row.tenant_id, []).append(row)
    for node in session.exec(select(NodeKey).order_by(col(NodeKey.created_at))):
        rows.setdefault(node.tenant_id, []).append(node)
    return rows


def _key_table(row: ApiKey | NodeKey) -> str:
    return str(type(row).__tablename__)


def _key_row_name(row: ApiKey | NodeKey) -> str:
    from tenancy.signing import KEY_TABLE

    if _key_table(row) == KEY_TABLE:
        return f"API key {row.prefix} (scopes {row.scopes}, id {row.id})"  # type: ignore[union-attr]
    revoked = "" if row.revoked_at is None else ", revoked"
    return f"node key {row.fingerprint} (enrolled by {row.enrolled_by!r}{revoked})"  # type: ignore[union-attr]


def _signature_problems(
    tenant_id: str,
    events: list[PrivacyEvent],
    budget: list[BudgetChange],
    key_rows: dict[str, list[ApiKey | NodeKey]],
    trusted: dict[str, bytes],
) -> list[str]:
    """Each ledger entry, budget change, API key row and node key enrollment of the tenant
    whose signature is not accepted, named (see tenancy.signing_audit)."""
    from tenancy.signing import check, row_message
    from tenancy.signing_audit import chain_signature_problems, describe

    found = []
    for ev, status in chain_signature_problems("privacy_event", events, trusted):
        found.append(
            f"tenant {tenant_id} ledger entry {ev.seq} (run {ev.run_id}, round {ev.round}, "
            f"noise {ev.noise_multiplier:g}): {describe(status)}"
        )
    for ch, status in chain_signature_problems("privacy_budget_change", budget, trusted):
        old = "none" if ch.old_epsilon is None else f"{ch.old_epsilon:g}"
        found.append(
            f"tenant {tenant_id} budget change {ch.seq} ({ch.dataset}: {old} -> "
            f"{ch.new_epsilon:g} by {ch.actor!r}): {describe(status)}"
        )
    for key in key_rows.get(tenant_id, []):
        status = check(key.signature, row_message(_key_table(key), key), trusted)
        if status != "ok":
            found.append(f"tenant {tenant_id} {_key_row_name(key)}: {describe(status)}")
    return found


@audit_app.command("keys")
def audit_keys(
    out: Annotated[
        Path, typer.Option(help="File to write the public keys to; '-' for standard output.")
    ] = Path("-"),
) -> None:
    """The platform's public signing keys, each endorsed by the one before: pin them and
    check later with `fedtext audit verify --keys FILE`."""
    from tenancy.errors import KeyProviderError

    platform = open_platform()
    try:
        history = platform.keyring.signing.history(refresh=True)
    except KeyProviderError as exc:
        raise UserError(f"Cannot read the platform's signing keys: {exc}") from None
    if not write_out(out, history.model_dump_json(indent=2) + "\n"):
        return
    current = history.current()
    console.print(
        f"{len(history.keys)} public key(s) written to {out}; current signing key "
        f"{current.key_id} (version {current.version}). Keep it to pin them."
    )


@audit_app.command("sign-existing")
def audit_sign_existing(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only list what would be signed.")
    ] = False,
) -> None:
    """Sign the rows made before signatures (v0006), once, after checking every chain.

    Refuses (exit 1) while any chain is broken, a budget in force differs from its chain,
    or a row carries a signature that does not verify: those are tampering, not age.
    Every unsigned API key row (tenant, prefix, scopes) and node key enrollment (tenant,
    fingerprint) is listed before it is signed: a key you do not recognise must be revoked,
    not signed.
    """
    from sqlalchemy import update
    from sqlmodel import Session

    from privacy.ledger import (
        all_tenant_ids,
        budget_changes,
        tenant_events,
        verify_chain,
    )
    from tenancy.signing import KEY_TABLE, NODE_TABLE, check, row_message
    from tenancy.signing_audit import (
        governance_counts_text,
        governance_row_name,
        sign_governance,
        unsigned_governance,
    )
    from tenancy.tables import Tenant

    platform = open_platform()
    trusted = _trusted_keys(platform, None)
    signing = platform.keyring.signing
    blockers: list[str] = []
    todo: list[tuple[Any, Any, str]] = []  # (table class, row, table name)
    with Session(platform.engine) as session:
        key_rows = _key_rows_by_tenant(session)
        for tenant_id in sorted(set(all_tenant_ids(session)) | set(key_rows)):
            row = session.get(Tenant, tenant_id)
            budget = budget_changes(session, tenant_id)
            for name, rows, chain_table in (
                ("ledger", tenant_events(session, tenant_id), "privacy_event"),
                ("budget chain", budget, "privacy_budget_change"),
                ("keys", key_rows.get(tenant_id, []), None),
            ):
                if chain_table is not None:
                    broken = verify_chain(rows)  # type: ignore[arg-type]
                    if broken is not None:
                        blockers.append(f"tenant {tenant_id} {name} {broken.seq}: {broken.reason}")
                for item in rows:
                    table = chain_table or _key_table(item)  # type: ignore[arg-type]
                    status = check(item.signature, row_message(table, item), trusted)
                    if status == "unsigned":
                        todo.append((type(item), item, table))
                    elif status != "ok":
                        which = _key_row_name(item) if chain_table is None else f"row {item.id}"  # type: ignore[arg-type,union-attr]
                        blockers.append(f"tenant {tenant_id} {name} {which}: {status}")
            wide = [c for c in budget if c.dataset == "*"]
            if row is not None and wide and abs(wide[-1].new_epsilon - row.budget_epsilon) > 1e-12:
                blockers.append(
                    f"tenant {tenant_id}: budget in force {row.budget_epsilon:g} differs from "
                    f"its budget chain ({wide[-1].new_epsilon:g})"
                )
        gov_todo, gov_blockers = unsigned_governance(session, trusted)
        blockers += gov_blockers
        if blockers:
            for b in blockers:
                err.print(f"[red]BROKEN[/red] {b}")
            err.print("Nothing was signed: find out what changed these rows first.")
            raise typer.Exit(1)
        for table, item in gov_todo:
            console.print(f"Tenant {item.tenant_id} {governance_row_name(table, item)}")
        for _cls, item, table in todo:
            if table == KEY_TABLE:
                console.print(
                    f"API key {item.prefix} (scopes {item.scopes}) of tenant "
                    f"{item.tenant_id}, created {item.created_at}"
                )
            elif table == NODE_TABLE:
                console.print(
                    f"Node key {item.fingerprint} enrolled for tenant {item.tenant_id} by "
                    f"{item.enrolled_by!r}, created {item.created_at}"
                )
        if not dry_run:
            for cls, item, table in todo:
                # A plain UPDATE: the ledger's ORM refuses to change its rows, by design.
                pk = cls.fingerprint if table == NODE_TABLE else cls.id
                session.execute(
                    update(cls)
                    .where(pk == (item.fingerprint if table == NODE_TABLE else item.id))
                    .values(signature=signing.sign(row_message(table, item)))
                )
            sign_governance(session, signing, gov_todo)
            session.commit()
    gov_counts = Counter(table for table, _ in gov_todo)
    counts = {t: sum(1 for _, _, tt in todo if tt == t) for t in ("privacy_event",
              "privacy_budget_change", KEY_TABLE, NODE_TABLE)}  # fmt: skip
    verb = "Would sign" if dry_run else "Signed"
    console.print(
        f"{verb} {counts['privacy_event']} ledger entr(ies), "
        f"{counts['privacy_budget_change']} budget change(s), {counts[KEY_TABLE]} API key(s), "
        f"{counts[NODE_TABLE]} node key enrollment(s), {governance_counts_text(gov_counts)}."
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
    privacy_unit: Annotated[
        str,
        typer.Option(
            help="example: each canary is one row; user: the tenants' rows are grouped into "
            "users and each canary is a user of --rows-per-user rows (checks the "
            "user-level claim, k = --rows-per-user)."
        ),
    ] = "example",
    rows_per_user: Annotated[
        int | None,
        typer.Option(help="privacy-unit user: rows per user and per canary user, k (default 4)."),
    ] = None,
) -> None:
    """Train with canaries, attack the model, compare the empirical bound with accounting.

    Exits 1 if the empirical lower bound on epsilon exceeds the accounted epsilon.
    """
    if privacy_unit not in ("example", "user"):
        raise UserError(f"--privacy-unit should be example or user, not {privacy_unit!r}.")
    if privacy_unit == "example" and rows_per_user is not None:
        raise UserError("--rows-per-user applies to --privacy-unit user only.")
    rows_per_user = 4 if rows_per_user is None else rows_per_user
    if rows_per_user < 1:
        raise UserError("--rows-per-user should be at least 1.")
    from fedtext.bootstrap import scratch_platform
    from orchestration.audit_canary import run_canary_audit
    from runs.simulation import SimulationFailed

    logging.basicConfig(level=logging.WARNING)
    try:
        report = run_canary_audit(
            open_platform=scratch_platform,
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
            privacy_unit=privacy_unit,
            canary_rows=rows_per_user,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    except (SimulationFailed, RuntimeError) as exc:
        raise fail(f"the canary federation failed: {exc}", code=1) from None
    o = report.outcome
    unit = (
        f"per user (k = {report.rows_per_user})" if report.privacy_unit == "user" else "per example"
    )
    table = Table("figure", "value", title=f"canary audit of tenant {report.tenant}, {unit}")
    table.add_row("run", report.run_id)
    table.add_row("privacy unit checked", unit)
    what = "canary users" if report.privacy_unit == "user" else "canaries"
    table.add_row(f"{what} (members)", f"{o.canaries} ({o.members})")
    if report.privacy_unit == "user":
        table.add_row("rows per canary user", str(report.rows_per_user))
    table.add_row("guesses, correct", f"{o.guesses}, {o.correct}")
    table.add_row("mean loss members / non-members",
                  f"{report.member_mean_loss:.4f} / {report.nonmember_mean_loss:.4f}")  # fmt: skip
    # Both figures say how sure they are: the lower bound holds with the audit's
    # confidence; the accounted epsilon is an upper bound over every release of the run.
    table.add_row(
        "empirical epsilon lower bound",
        f"{report.lower_bound:.4f} (holds with {o.confidence:.0%} confidence)",
    )
    table.add_row(
        f"accounted epsilon at delta {report.delta:g}",
        f"{report.accounted_epsilon:.4f} (upper bound, PRV, every release)",
    )
    table.add_row("accounted epsilon (RDP)", f"{report.accounted_epsilon_rdp:.4f} (looser)")
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
        f"OK ({unit}): lower bound {report.lower_bound:.4f} ({o.confidence:.0%} confidence) <= "
        f"accounted {report.accounted_epsilon:.4f}. A lower bound far below the accounted "
        "figure is expected: a small audit only shows that no gross bug is present."
    )
