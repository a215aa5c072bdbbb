"""`fedtext demo`: three tenants, a DP federation, encrypted models, predictions over HTTP.

The demo's steps are in :mod:`fedtext.demo`; this is its command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedtext.cli.console import console, fail, settings


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

    target = data_dir or (settings().data_dir / "demo")
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
        raise fail(f"plaintext weights found: {report.plaintext_files}", code=1)
