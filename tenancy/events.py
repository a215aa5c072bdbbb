"""Change notifications: tenancy's write functions say what changed, once it is committed.

Layers above tenancy keep memos of what tenancy's tables say (serving keeps which key is
live and which version is deployed). Tenancy must not import them, so they subscribe here
and the write functions ``record`` each change on their session; subscribers hear it
after that session commits (a change that is never committed is never announced).

Only this process hears: changes made by another process (the CLI, another API worker)
reach a memo through its own periodic refresh.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction

log = logging.getLogger("fedtext.tenancy.events")

_PENDING = "fedtext.tenancy.changes"  # key in Session.info


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
    """Announce ``change`` to subscribers when ``session`` commits."""
    session.info.setdefault(_PENDING, []).append(change)


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
