"""`fedtext demo`: three tenants, a DP federation, encrypted models, predictions over HTTP.

The demo's steps are in :mod:`fedtext.demo`; this is its command.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from fedtext.cli.console import console, fail, settings


def demo(
    rounds: Annotated[
        int | None,
        typer.Option(
            help=escape("Federated rounds [default: the model family's]"), show_default=False
        ),
    ] = None,
    epsilon: Annotated[float, typer.Option(help="Target epsilon per tenant.")] = 4.0,
    max_train_examples: Annotated[int, typer.Option(help="Training examples per tenant.")] = 3000,
    max_test_examples: Annotated[int, typer.Option(help="Test examples per tenant.")] = 600,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where the demo keeps its database and keys (reset first) "
            "(default: FEDTEXT_DATA_DIR/demo)",
            show_default=False,
        ),
    ] = None,
    serve: Annotated[
        bool, typer.Option("--serve", help="Keep the API running with the demo's tenants.")
    ] = False,
    port: Annotated[int, typer.Option(help="The API's port with --serve.")] = 8000,
    insecure: Annotated[bool, typer.Option(help="Turn secure_mode off (tests only).")] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Show the libraries' logs here too.")
    ] = False,
) -> None:
    """Three tenants, a DP federation, encrypted models, predictions over HTTP."""
    from fedtext.demo import DemoRefused, print_report, run_demo
    from fedtext.log_file import setup

    home = settings().data_dir
    if verbose:
        setup(home, verbose=True)
    target = data_dir or (home / "demo")
    try:
        report = run_demo(
            target,
            rounds=rounds,
            epsilon=epsilon,
            max_train_examples=max_train_examples,
            max_test_examples=max_test_examples,
            secure_mode=not insecure,
            console=console,
        )
    except DemoRefused as exc:
        raise fail(str(exc), code=2) from None
    if report.plaintext_files:
        print_report(report, console)
        raise fail(f"plaintext weights found: {report.plaintext_files}", code=1)
    if not serve:
        print_report(report, console)
        return
    _serve(report, port)


def _serve(report: object, port: int) -> None:
    """The demo's platform behind the API on 127.0.0.1:PORT until Ctrl-C."""
    import uvicorn

    from fedtext.bootstrap import platform_from_settings
    from fedtext.demo import DemoReport, print_report
    from fedtext.settings import Settings
    from serving.app import create_app
    from serving.config import ServingConfig

    assert isinstance(report, DemoReport)
    demo_settings = Settings(
        data_dir=report.data_dir, database_url=None, key_provider="file", kek_file=None
    )
    app = create_app(
        platform_from_settings(demo_settings),
        ServingConfig(operator_token=secrets.token_urlsafe(32)),
    )
    print_report(report, console, serving_url=f"http://127.0.0.1:{port}")
    uvicorn.run(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
