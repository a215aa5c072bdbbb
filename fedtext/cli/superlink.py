"""How the `fedtext federation` commands reach a SuperLink: their shared options and the
connection that ``flwr`` then uses."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from orchestration.flower import check_certificate, check_reachable, existing_file, write_connection

DEFAULT_SUPERLINK_PORT = 9092
DEFAULT_CONNECTION = "fedtext"

SuperlinkOpt = Annotated[
    str,
    typer.Option(
        "--superlink",
        envvar="FEDTEXT_SUPERLINK",
        help="The SuperLink's address as host:port (as named in its certificate).",
    ),
]
CaOpt = Annotated[
    Path | None,
    typer.Option(
        "--ca",
        envvar="FEDTEXT_SUPERLINK_CA",
        help="The federation's CA certificate (ca.crt).",
    ),
]
ConnectionOpt = Annotated[
    str,
    typer.Option(
        help="Name of the SuperLink connection written to $FLWR_HOME/config.toml.",
    ),
]


def connect(superlink: str, ca: Path | None, connection: str) -> str:
    """Check the CA certificate and that the SuperLink answers; write the connection
    ``connection`` to ``$FLWR_HOME/config.toml``; return its name."""
    ca_path = existing_file(ca, "CA certificate", " (--ca or FEDTEXT_SUPERLINK_CA)")
    check_certificate(ca_path, "CA certificate")
    check_reachable(superlink)
    write_connection(connection, superlink, ca_path)
    return connection
