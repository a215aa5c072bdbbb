"""`fedtext audit canary`: the empirical lower bound on epsilon (the federation itself is
orchestration/canary_federation.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedtext.cli.console import (
    UserError,
    console,
    err,
    fail,
)


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
    from orchestration.canary_federation import run_canary_audit
    from orchestration.simulation import SimulationFailed

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
