"""Where a run stands: every write of a run's status goes through these transitions.

Each end is one conditional UPDATE (``end_run``), so an end recorded concurrently (a
cancel above all) is never overwritten. Reads never write: orphaned runs are marked
interrupted by ``reap_orphaned_runs``, which the API runs at startup and on a timer.

A cancel is recorded in two steps: ``request_cancel`` writes who asked (``cancelled_by``)
before the worker is stopped, and ``cancel_run`` writes the end after. Every end written
meanwhile (the worker failing as it is killed, the reaper finding it gone) reads the
request and records the run cancelled, so a cancel is never recorded as interrupted.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, case, literal, update
from sqlmodel import Session, col, select

from runs.status import ACTIVE, FINISHED, RunStatus
from tenancy.db import session_scope
from tenancy.tables import TrainingRun, utcnow

HEARTBEAT_SECONDS = 2.0
# A worker that has not beaten for this long is gone (killed, host lost), whatever its PID.
STALE_AFTER = timedelta(seconds=30)


def new_run(**fields: Any) -> TrainingRun:
    """A run row in its first status; the caller adds it (with what commits beside it)."""
    return TrainingRun(status=RunStatus.CREATED, **fields)


def get_run(engine: Engine, run_id: str) -> TrainingRun | None:
    with Session(engine, expire_on_commit=False) as session:
        return session.get(TrainingRun, run_id)


def run_status(engine: Engine, run_id: str) -> RunStatus | None:
    run = get_run(engine, run_id)
    return RunStatus(run.status) if run is not None else None


def record_request(engine: Engine, run_id: str, request: dict[str, Any], *, merge: bool) -> None:
    """Store how the run was asked for (``simulation_json``), creating the row if needed;
    ``merge`` adds the keys to what is stored."""
    with session_scope(engine) as session:
        run = session.get(TrainingRun, run_id) or new_run(id=run_id)
        stored = json.loads(run.simulation_json or "{}") if merge else {}
        run.simulation_json = json.dumps({**stored, **request})
        session.add(run)


def update_run(engine: Engine, run_id: str, **fields: Any) -> None:
    """Set fields of the run that are not its status (plans, checkpoint, config)."""
    assert "status" not in fields, "statuses change through the transitions"
    with session_scope(engine) as session:
        run = session.get(TrainingRun, run_id) or new_run(id=run_id)
        for key, value in fields.items():
            setattr(run, key, value)
        session.add(run)


def start_run(engine: Engine, run_id: str, *, config_json: str, resume: bool) -> bool:
    """The ServerApp starts (or resumes) the run; False if it was cancelled (before it
    started, or, for a resume, at any time: resuming continues an interrupted run)."""
    with session_scope(engine) as session:
        run = session.get(TrainingRun, run_id)
        if run is None:  # started with `flwr run`, not through the platform
            run = new_run(id=run_id)
        elif run.status == RunStatus.CANCELLED or run.cancelled_by is not None:
            return False  # a cancel is final: never started, never resumed
        run.status, run.error, run.config_json = RunStatus.RUNNING, None, config_json
        if resume:
            # The process resuming the run (a CLI, a ServerApp, a retrying worker) is its
            # worker from now on: the reaper judges it, not the worker that was lost.
            run.worker_pid, run.worker_host = os.getpid(), socket.gethostname()
            run.heartbeat_at = utcnow()
        session.add(run)
    if resume:
        _beat_while_running(engine, run_id, os.getpid())
    return True


def _beat_while_running(engine: Engine, run_id: str, pid: int) -> None:
    """Beat on the run from a thread of this process while it is running here."""

    def loop() -> None:
        while True:
            time.sleep(HEARTBEAT_SECONDS)
            try:
                with engine.begin() as connection:
                    result = connection.execute(
                        update(TrainingRun)
                        .where(
                            col(TrainingRun.id) == run_id,
                            col(TrainingRun.status) == RunStatus.RUNNING.value,
                            col(TrainingRun.worker_pid) == pid,
                        )
                        .values(heartbeat_at=utcnow())
                    )
            except Exception:  # a missed beat is not fatal; a long silence marks the run
                continue
            if not result.rowcount:
                return  # ended, or another process took the run over

    threading.Thread(target=loop, daemon=True, name=f"beat-{run_id[:8]}").start()


def complete_run(engine: Engine, run_id: str, *, summary_json: str, **fields: Any) -> None:
    """The run released its models: completed, whatever was asked of it meanwhile (a late
    cancel cannot take back what was released and charged)."""
    with session_scope(engine) as session:
        run = session.get(TrainingRun, run_id) or new_run(id=run_id)
        for key, value in fields.items():
            setattr(run, key, value)
        run.status, run.summary_json, run.finished_at = RunStatus.COMPLETED, summary_json, utcnow()
        session.add(run)


def end_run(
    engine: Engine,
    run_id: str,
    status: RunStatus,
    error: str,
    *,
    unless: Iterable[RunStatus] = FINISHED,
) -> bool:
    """Give the run an end ``status`` unless its status is one of ``unless`` (by default: it
    has ended already). True if the run was changed.

    A run whose cancel was asked (``cancelled_by``) ends cancelled whatever ``status`` says:
    a worker that fails or vanishes while it is being stopped was stopped by the cancel.
    """
    status = RunStatus(status)  # callers may pass the plain value
    assert status in FINISHED
    asked = col(TrainingRun.cancelled_by).is_not(None)
    with engine.begin() as connection:
        result = connection.execute(
            update(TrainingRun)
            .where(col(TrainingRun.id) == run_id, col(TrainingRun.status).not_in(list(unless)))
            .values(
                status=case(
                    (asked, literal(RunStatus.CANCELLED.value)), else_=literal(status.value)
                ),
                error=case(
                    (asked, literal("Cancelled by ") + col(TrainingRun.cancelled_by) + "."),
                    else_=literal(error),
                ),
                finished_at=utcnow(),
            )
        )
    return bool(result.rowcount)


def fail_run(engine: Engine, run_id: str, error: str) -> bool:
    """Record a failure, unless the run was cancelled (a stopped run fails by design)."""
    return end_run(engine, run_id, RunStatus.FAILED, error, unless=(RunStatus.CANCELLED,))


def reopen_for_retry(engine: Engine, run_id: str, note: str) -> bool:
    """A run failed by a database outage goes on (its worker resumes it): running again,
    ``note`` saying why, unless it was cancelled or ended otherwise meanwhile."""
    with engine.begin() as connection:
        result = connection.execute(
            update(TrainingRun)
            .where(
                col(TrainingRun.id) == run_id,
                col(TrainingRun.status) == RunStatus.FAILED.value,
                col(TrainingRun.cancelled_by).is_(None),
            )
            .values(
                status=RunStatus.RUNNING.value, error=note, finished_at=None, heartbeat_at=utcnow()
            )
        )
    return bool(result.rowcount)


def request_cancel(engine: Engine, run_id: str, by: str) -> bool:
    """Record who cancels the run, before its worker is stopped; False if the run is no
    longer active (it ended first) or a cancel was already asked."""
    with engine.begin() as connection:
        result = connection.execute(
            update(TrainingRun)
            .where(
                col(TrainingRun.id) == run_id,
                col(TrainingRun.status).in_(list(ACTIVE)),
                col(TrainingRun.cancelled_by).is_(None),
            )
            .values(cancelled_by=by)
        )
    return bool(result.rowcount)


def withdraw_cancel(engine: Engine, run_id: str) -> None:
    """The stop was not confirmed (a SuperLink that did not answer): the run goes on."""
    with engine.begin() as connection:
        connection.execute(
            update(TrainingRun)
            .where(col(TrainingRun.id) == run_id, col(TrainingRun.status).in_(list(ACTIVE)))
            .values(cancelled_by=None)
        )


def cancel_run(engine: Engine, run_id: str, by: str) -> bool:
    """Record the run cancelled by ``by`` once its worker is stopped. An end written while
    it was being stopped (failed, interrupted) gives way; a completed run stays completed
    (what it released is released and charged)."""
    with engine.begin() as connection:
        connection.execute(
            update(TrainingRun)
            .where(col(TrainingRun.id) == run_id, col(TrainingRun.cancelled_by).is_(None))
            .values(cancelled_by=by)
        )
    return end_run(
        engine,
        run_id,
        RunStatus.CANCELLED,
        f"Cancelled by {by}.",
        unless=(RunStatus.COMPLETED, RunStatus.CANCELLED),
    )


def is_cancelled(engine: Engine, run_id: str) -> bool:
    """Whether the run was cancelled or its cancel asked (the ServerApp then stands down)."""
    run = get_run(engine, run_id)
    return run is not None and (run.status == RunStatus.CANCELLED or run.cancelled_by is not None)


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


def reap_orphaned_runs(engine: Engine) -> list[str]:
    """Mark HTTP-started runs whose worker is gone as interrupted (resumable); return ids."""
    with Session(engine) as session:
        rows = list(
            session.exec(
                select(TrainingRun).where(
                    col(TrainingRun.status).in_(ACTIVE),
                    col(TrainingRun.owner_tenant_id).is_not(None),
                )
            )
        )
    reaped = []
    now = utcnow()
    for run in rows:
        reason = worker_gone(run, now)
        if reason is not None and end_run(
            engine, run.id, RunStatus.INTERRUPTED, f"Interrupted: {reason}. {_what_now(run)}"
        ):
            reaped.append(run.id)
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


def claim_run(engine: Engine, run_id: str) -> TrainingRun | None:
    """The worker records its PID and host on the run before it starts training."""
    with session_scope(engine) as session:
        run = session.get(TrainingRun, run_id)
        if run is None:
            return None
        run.worker_pid = os.getpid()
        run.worker_host = socket.gethostname()
        run.heartbeat_at = utcnow()
        session.add(run)
        session.flush()
        session.refresh(run)
        session.expunge(run)
    return run


def beat(engine: Engine, run_id: str, **worker: Any) -> None:
    """The worker is alive (optionally: its ``worker_pid`` and ``worker_host``)."""
    with engine.begin() as connection:
        connection.execute(
            update(TrainingRun)
            .where(col(TrainingRun.id) == run_id)
            .values(heartbeat_at=utcnow(), **worker)
        )


def active_runs_of(engine: Engine, *, tenant_id: str, name: str) -> list[TrainingRun]:
    """Active runs that ``tenant_id`` takes part in (named in the request or planned)."""
    with Session(engine, expire_on_commit=False) as session:
        rows = list(session.exec(select(TrainingRun).where(col(TrainingRun.status).in_(ACTIVE))))
    found = []
    for run in rows:
        named = json.loads(run.simulation_json or "{}").get("tenants") or []
        plans = json.loads(run.plans_json or "{}")
        if name in named or any(p.get("tenant_id") == tenant_id for p in plans.values()):
            found.append(run)
    return found


def active_run_ids(session: Session) -> set[str]:
    """Runs that may still dispatch releases: their budget reservations hold."""
    return set(session.exec(select(TrainingRun.id).where(col(TrainingRun.status).in_(ACTIVE))))
