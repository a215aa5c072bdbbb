"""Change notifications: tenancy's write functions say what changed, once it is committed.

Layers above tenancy keep memos of what tenancy's tables say (serving keeps which key is
live and which version is deployed). Tenancy must not import them, so they subscribe here
and the write functions ``record`` each change on their session; subscribers hear it
after that session commits (a change that is never committed is never announced).

Other processes (the CLI, other API replicas on the same database) learn of a change
from the ``tenancy_change`` log: ``record`` also adds the change to it in the same
transaction, and each API reads it every lookup interval through a ``ChangeFeed``
(serving/runtime/lookups.py), announcing what *other* processes wrote to its own subscribers.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import delete, event, func, select
from sqlalchemy.orm import Session, SessionTransaction
from sqlmodel import col

from tenancy.tables import TenancyChange, utcnow

log = logging.getLogger("fedtext.tenancy.events")

_PENDING = "fedtext.tenancy.changes"  # key in Session.info
# This process, in the change log: its own rows are announced at commit, not read back.
ORIGIN = f"{os.getpid()}-{uuid.uuid4().hex[:16]}"


class ChangeKind(StrEnum):
    key_revoked = "key_revoked"
    tenant_deleted = "tenant_deleted"
    version_deployed = "version_deployed"
    serving_options = "serving_options"  # how a version is served (e.g. quantized)
    data_key_rotated = "data_key_rotated"  # a tenant's blobs were re-encrypted


@dataclass(frozen=True)
class Change:
    kind: ChangeKind
    tenant_id: str
    name: str | None = None  # the model's name, for changes of a model


Listener = Callable[[Change], None]

_lock = threading.Lock()
_listeners: list[weakref.ref[Any]] = []


def subscribe(listener: Listener) -> Callable[[], None]:
    """Call ``listener`` with each committed change; returns a function that unsubscribes.

    The listener is held weakly (a bound method through ``weakref.WeakMethod``), so a
    subscriber that is dropped (an app built by a test) stops listening by itself; keep
    a reference to anything else you subscribe. Listeners run in the committing thread
    and must be quick and thread-safe.
    """
    ref: weakref.ref[Any] = (
        weakref.WeakMethod(listener) if hasattr(listener, "__self__") else weakref.ref(listener)
    )
    with _lock:
        _listeners.append(ref)

    def unsubscribe() -> None:
        with _lock:
            if ref in _listeners:
                _listeners.remove(ref)

    return unsubscribe


def record(session: Session, change: Change) -> None:
    """Announce ``change`` to subscribers when ``session`` commits (here and elsewhere)."""
    session.info.setdefault(_PENDING, []).append(change)
    session.add(
        TenancyChange(
            kind=change.kind.value, tenant_id=change.tenant_id, name=change.name, origin=ORIGIN
        )
    )


def publish(change: Change) -> None:
    """Announce ``change`` now (to each live listener; one that fails is logged, not raised).

    The write is already committed: a failing listener must not make it look failed.
    """
    with _lock:
        _listeners[:] = [ref for ref in _listeners if ref() is not None]
        listeners = [ref() for ref in _listeners]
    for listener in listeners:
        if listener is None:
            continue
        try:
            listener(change)
        except Exception:
            log.exception("a tenancy change listener failed", extra={"fields": {"change": change}})


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    for change in session.info.pop(_PENDING, ()):
        publish(change)


@event.listens_for(Session, "after_transaction_end")
def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    # Fired after after_commit: what is still pending when the outermost transaction ends
    # was rolled back or never committed. A savepoint's end keeps it (the outer one may
    # still commit; announcing too much is harmless, too little is not).
    if transaction.parent is None and not transaction.nested:
        session.info.pop(_PENDING, None)


class ChangeFeed:
    """The changes other processes committed, read from the ``tenancy_change`` log.

    ``poll`` returns, in order, the rows added since the previous poll whose origin is
    another process (the first poll returns those written since the feed was made, less a
    minute for clocks that differ between machines: announcing too much is harmless,
    too little is not). PostgreSQL hands out ids before commit, so a transaction may commit
    a smaller id after a larger one was read: each poll re-reads the last ``window`` ids
    and skips those already seen. Rows older than ``keep`` are pruned now and then.
    """

    def __init__(self, *, window: int = 256, keep: timedelta = timedelta(hours=1)) -> None:
        self.window = window
        self.keep = keep
        self._last: int | None = None
        self._seen: set[int] = set()
        self._polls = 0
        self._since = utcnow() - timedelta(minutes=1)

    def poll(self, session: Session) -> list[Change]:
        first = self._last is None
        if self._last is None:
            self._last = int(session.execute(select(func.max(TenancyChange.id))).scalar() or 0)
        floor = max(0, self._last - self.window)
        rows = session.execute(
            select(TenancyChange)
            .where(col(TenancyChange.id) > floor)
            .order_by(col(TenancyChange.id))
        ).scalars()
        changes: list[Change] = []
        for row in rows:
            assert row.id is not None
            if row.id in self._seen:
                continue
            self._seen.add(row.id)
            self._last = max(self._last, row.id)
            if row.origin != ORIGIN and (not first or _aware(row.created_at) >= self._since):
                try:
                    kind = ChangeKind(row.kind)
                except ValueError:  # written by a newer version: the memo is cleared anyway
                    kind = ChangeKind.serving_options
                changes.append(Change(kind, row.tenant_id, row.name))
        self._seen = {i for i in self._seen if i > self._last - self.window}
        self._polls += 1
        if self._polls % 600 == 0:
            session.execute(
                delete(TenancyChange).where(col(TenancyChange.created_at) < utcnow() - self.keep)
            )
            session.commit()
        return changes


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
