"""What an Open Inference Protocol server says of itself, and where its gRPC side listens
(both transports; kept apart from the gRPC modules, whose protocol classes clash with
tritonclient's in one process)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import text as sql_text

from serving.limits import Limits

SERVER_NAME = "fedtext"
EXTENSIONS = ("binary_tensor_data",)


@dataclass(frozen=True)
class GrpcEndpoint:
    """Where the gRPC server listens; TLS when both ``certfile`` and ``keyfile`` are given."""

    port: int
    host: str = "127.0.0.1"
    certfile: Path | None = None
    keyfile: Path | None = None
    # The largest request message, bytes (the HTTP body limit's counterpart).
    max_message_bytes: int = 1 << 20
    # False: a port that is taken only loses gRPC (a warning), as for the default port, so
    # a second server on the host still serves HTTP; True (a port asked for): startup fails.
    required: bool = True
    # The HTTP API's per-key and failed-authentication rate limits, applied to gRPC calls.
    limits: Limits | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError("The gRPC port should be between 0 and 65535.")
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("gRPC TLS needs both a certificate file and a key file.")


def server_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedtext")
    except PackageNotFoundError:
        return "0.1.0"


def ready(platform: Any) -> bool:
    """Database answers and the key provider yields the key-encryption key (as /readyz)."""
    try:
        with platform.engine.connect() as conn:
            conn.execute(sql_text("SELECT 1"))
        platform.keyring.provider.check()
    except Exception:  # the database is away, or KeyProviderError
        return False
    return True
