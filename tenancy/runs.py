"""Training runs started over HTTP: ownership, worker liveness and orphan reconciliation."""

from __future__ import annotations

import json
import os
import socket
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, update
from sqlmodel import Session, col, select

from tenancy.tables import TrainingRun, utcnow

ACTIVE = ("created", "running")
FINISHED = ("completed", "failed", "cancelled", "interrupted")
HEARTBEAT_SECONDS = 2.0
# A worker that has not beaten for this long is gone (killed, host lost), whatever its PID.
STALE_AFTER = timedelta(seconds=30)


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this host (zombies count as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True


def worker_gone(run: TrainingRun, now: datetime | None = None) -> str | None:
    """Why the run's worker is gone, or None while it may still be working."""
    now = now or utcnow()
    if run.worker_pid is None:
        # Never claimed by a worker: gone once the launch is clearly over.
        if now - _aware(run.created_at) > STALE_AFTER:
            return "its worker never started"
        return None
    if run.worker_host == socket.gethostname() and not pid_alive(run.worker_pid):
        return f"its worker (pid {run.worker_pid}) is gone"
    if run.heartbeat_at is not None and now - _aware(run.heartbeat_at) > STALE_AFTER:
        return f"its worker (pid {run.worker_pid}) stopped reporting"
    return None


def reap_orphaned_runs(session: Session) -> list[str]:
    """Mark HTTP-started runs whose worker is gone as interrupted (resumable); return ids."""
    rows = session.exec(
        select(TrainingRun).where(
            col(TrainingRun.status).in_(ACTIVE), col(TrainingRun.owner_tenant_id).is_not(None)
        )
    )
    reaped = []
    now = utcnow()
    for run in rows:
        reason = worker_gone(run, now)
        if reason is None:
            continue
        run.status = "interrupted"
        run.error = f"Interrupted: {reason}. {_what_now(run)}"
        run.finished_at = now
        session.add(run)
        reaped.append(run.id)
    session.commit()
    return reaped


def _what_now(run: TrainingRun) -> str:
    request = json.loads(run.simulation_json or "{}")
    if "superlink" not in request:
        return f"Resume it with: fedtext simulate --resume {run.id}"
    # A federation run: the ServerApp on the SuperLink may still finish (and record) it.
    flower = request.get("flower_run_id")
    if flower is None:
        return "It was never submitted to the SuperLink; start a new run."
    return (
        f"Its Flower run {flower} may still be running on {request['superlink']}: "
        f"`fedtext federation status {flower} --run-id {run.id}`; "
        f"stop it with `flwr stop {flower}`."
    )


def end_run(
    engine: Engine,
    run_id: str,
    status: str,
    error: str,
    *,
    unless: tuple[str, ...] = FINISHED,
) -> bool:
    """Give the run an end ``status`` unless its status is one of ``unless`` (by default: it
    has ended already). One conditional UPDATE, so an end recorded concurrently, a cancel
    above all, is never overwritten. True if the run was changed."""
    with engine.begin() as connection:
        result = connection.execute(
            update(TrainingRun)
            .where(col(TrainingRun.id) == run_id, col(TrainingRun.status).not_in(unless))
            .values(status=status, error=error, finished_at=utcnow())
        )
    return bool(result.rowcount)


def claim_run(session: Session, run_id: str) -> TrainingRun | None:
    """The worker records its PID and host on the run before it starts training."""
    run = session.get(TrainingRun, run_id)
    if run is None:
        return None
    run.worker_pid = os.getpid()
    run.worker_host = socket.gethostname()
    run.heartbeat_at = utcnow()
    session.add(run)
    session.commit()
    return run


def beat(session: Session, run_id: str) -> None:
    run = session.get(TrainingRun, run_id)
    if run is not None:
        run.heartbeat_at = utcnow()
        session.add(run)
        session.commit()


def active_run_ids(session: Session) -> set[str]:
    """Runs that may still dispatch releases: their budget reservations hold."""
    return set(session.exec(select(TrainingRun.id).where(col(TrainingRun.status).in_(ACTIVE))))
