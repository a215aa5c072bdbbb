"""`fedtext audit ...`: the privacy ledger's checks, reports and exports for auditors.

This module: the group, and whether the record is intact and signed (`verify`, `keys`,
`sign-existing`); the reports and exports in audit_exports.py, the canary audit in
audit_canary.py."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fedtext.cli.audit_canary import audit_canary
from fedtext.cli.audit_exports import audit_export, audit_report
from fedtext.cli.console import (
    UserError,
    console,
    err,
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


# Registered here, in the order `fedtext audit --help` lists them.
audit_app.command("report")(audit_report)
audit_app.command("export")(audit_export)
audit_app.command("canary")(audit_canary)
