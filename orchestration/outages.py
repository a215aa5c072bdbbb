"""A run worker through a short database outage (PostgreSQL restarted, connections killed).

Two layers, both bounded and both only for connection errors:

1. Connecting waits: while the server refuses connections (down, starting up, in
   recovery), each new connection is retried with backoff for up to
   ``CONNECT_PATIENCE_S``. With the pool's pre-ping (tenancy.db) a connection killed
   while idle is replaced on its next use, so an outage between two statements delays
   the run instead of failing it. Nothing is re-executed: only the connect is retried.
2. A run that still failed on a lost connection (one killed inside a transaction) is
   resumed from its checkpoint, at most ``MAX_OUTAGE_RETRIES`` times, and only when the
   ledger shows that the round the resume re-runs was not charged: a resume never
   charges a committed round again (``retry_blocker``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.engine import ExceptionContext
from sqlmodel import Session, col, select

from runs.status import RunStatus
from tenancy.tables import TrainingRun

CONNECT_PATIENCE_S = 60.0
MAX_OUTAGE_RETRIES = 3
OUTAGE_BACKOFF_S = 2.0

# What libpq and psycopg say when the server went away or is not taking connections.
# Authentication and permission errors are not among them: those are never retried.
CONNECTION_LOST = (
    "server closed the connection unexpectedly",
    "terminating connection due to administrator command",
    "the database system is not yet accepting connections",
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "could not connect to server",
    "connection refused",
    "could not receive data from server",
    "could not send data to server",
    "ssl syscall error",
    "connection already closed",
    "no connection to the server",
)


def is_connection_error(text: str) -> bool:
    lowered = text.lower()
    return any(marker in lowered for marker in CONNECTION_LOST)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


@dataclass
class Outages:
    """Connection errors seen on one engine; makes its connects wait out an outage."""

    seen: int = 0
    last: str = ""
    patience: float = CONNECT_PATIENCE_S

    @classmethod
    def watch(cls, engine: Engine, patience: float = CONNECT_PATIENCE_S) -> Outages:
        found = cls(patience=patience)
        if engine.dialect.name != "sqlite":  # a file: nothing to wait for
            event.listen(engine, "handle_error", found._on_error)
            event.listen(engine, "do_connect", found._connect)
        return found

    def _note(self, error: BaseException) -> None:
        self.seen += 1
        self.last = _first_line(error)

    def _on_error(self, context: ExceptionContext) -> None:
        error = context.original_exception
        if context.is_disconnect or is_connection_error(str(error)):
            self._note(error)

    def _connect(self, dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
        deadline = time.monotonic() + self.patience
        delay = 0.25
        while True:
            try:
                return dialect.connect(*cargs, **cparams)
            except dialect.loaded_dbapi.Error as exc:
                if not is_connection_error(str(exc)) or time.monotonic() + delay > deadline:
                    raise
                self._note(exc)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)


def reopen_blocker(run: TrainingRun | None) -> str | None:
    if run is None:
        return "the run is gone"
    if run.cancelled_by is not None or run.status == RunStatus.CANCELLED:
        return "it was cancelled"
    if run.status != RunStatus.FAILED:
        return f"it is {run.status}"
    if not is_connection_error(run.error or ""):
        return "it failed for another reason than a lost database connection"
    return None


def retry_blocker(engine: Engine, run_id: str, outages: Outages) -> str | None:
    """Why the failed run must not be resumed after an outage; None when it may."""
    from privacy.ledger import PrivacyEvent

    if not outages.seen:
        return "no lost database connection was seen"
    with Session(engine) as session:
        run = session.get(TrainingRun, run_id)
        why = reopen_blocker(run)
        if why is not None or run is None:
            return why
        again = run.checkpoint_round + 1
        charged = session.exec(
            select(PrivacyEvent.id).where(
                col(PrivacyEvent.run_id) == run_id, col(PrivacyEvent.round) == again
            )
        ).first()
    if charged is not None:
        return (
            f"round {again} was charged before the connection was lost; a resume would "
            "charge it again (resume it yourself to accept that)"
        )
    return None
