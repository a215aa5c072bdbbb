"""The `fedtext` command line: one module per command group, one console
(:mod:`fedtext.cli.console`) for their output and errors.

    simulate    fedtext.cli.simulate     tenant ...      fedtext.cli.tenant
    serve       fedtext.cli.serve        keys ...        fedtext.cli.keys
    demo        fedtext.cli.demo         audit ...       fedtext.cli.audit
                                         db ...          fedtext.cli.db
                                         policy ...      fedtext.cli.policy
                                         federation ...  fedtext.cli.federation
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from fedtext.cli.audit import audit_app
from fedtext.cli.console import CliGroup
from fedtext.cli.db import db_app
from fedtext.cli.demo import demo
from fedtext.cli.federation import federation_app
from fedtext.cli.keys import keys_app
from fedtext.cli.policy import policy_app
from fedtext.cli.serve import serve
from fedtext.cli.simulate import simulate
from fedtext.cli.tenant import tenant_app

app = typer.Typer(
    cls=CliGroup,
    no_args_is_help=True,
    help="Federated, differentially private text classifiers.",
)
app.add_typer(tenant_app, name="tenant")
app.add_typer(policy_app, name="policy")
app.add_typer(keys_app, name="keys")
app.add_typer(audit_app, name="audit")
app.add_typer(db_app, name="db")
app.add_typer(federation_app, name="federation")
for _command in (simulate, serve, demo):
    app.command()(_command)


@app.callback()
def _quiet_libraries(
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            help="Show the libraries' logs and warnings (Flower, Ray, Opacus, Alembic, "
            "uvicorn) here; without it they go to DATA_DIR/logs/fedtext.log.",
        ),
    ] = False,
) -> None:
    """Federated, differentially private text classifiers."""
    from fedtext.log_file import setup

    setup(_data_dir(), verbose=verbose)


def _data_dir() -> Path:
    from fedtext.settings import Settings

    try:
        return Settings().data_dir
    except ValueError:  # the command itself reports a bad setting
        return Path(os.environ.get("FEDTEXT_DATA_DIR") or "./var")


def main() -> None:  # pragma: no cover - console entry
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    # What the CLI writes (database, keys, blobs, logs, run folders) is its owner's only,
    # whatever umask it was started with (docs/SECURITY.md).
    os.umask(0o077)
    app()


__all__ = ["app", "main"]
