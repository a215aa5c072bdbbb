"""The protections behind the SuperLink SIGKILL test (test_superlink_fault.py), checked
quickly: how the federation worker reads a Flower run that ended without its ServerApp
recording an end (orchestration/federation.py ``follow``; Flower's answer given), and a resume
started while the API runs is not reaped for the worker it replaces (runs/lifecycle.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlmodel import Session

import orchestration.federation as federation
from orchestration.federation import follow
from runs.lifecycle import HEARTBEAT_SECONDS, end_run, reap_orphaned_runs, start_run
from runs.status import RunStatus
from tenancy.db import create_tables
from tenancy.tables import TrainingRun

pytestmark = pytest.mark.faults

NO_HEARTBEAT = ("finished:failed", "No heartbeat received from the task")


@pytest.fixture
def engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    create_tables(engine)
    # What Flower 1.41's SuperLink says of a run whose ServerApp died with the old SuperLink.
    monkeypatch.setattr(federation, "flower_run_status", lambda _c, _id: NO_HEARTBEAT)
    return engine


def _row(engine, run_id: str, status: RunStatus, **fields: object) -> None:  # type: ignore[no-untyped-def]
    request = {"superlink": "127.0.0.1:9092", "flower_run_id": 7}
    with Session(engine) as session:
        session.add(
            TrainingRun(id=run_id, status=status, simulation_json=json.dumps(request), **fields)
        )
        session.commit()


def _get(engine, run_id: str) -> TrainingRun:  # type: ignore[no-untyped-def]
    with Session(engine) as session:
        row = session.get(TrainingRun, run_id)
        assert row is not None
        return row


def test_a_started_run_whose_serverapp_vanished_is_interrupted_and_says_how_to_resume(
    engine,  # type: ignore[no-untyped-def]
) -> None:
    _row(engine, "r", RunStatus.RUNNING, checkpoint_round=2)
    assert follow(engine, "r", 7, poll=0.01, flower_every=0) == RunStatus.INTERRUPTED
    error = _get(engine, "r").error or ""
    assert "No heartbeat received from the task" in error
    assert "Rounds done: 2" in error
    assert (
        "fedtext federation run --superlink 127.0.0.1:9092 --ca CA_FILE --run-id r "
        "--config resume=true" in error
    ), error


def test_a_run_whose_serverapp_never_started_fails_with_flowers_reason(engine) -> None:  # type: ignore[no-untyped-def]
    _row(engine, "c", RunStatus.CREATED)
    assert follow(engine, "c", 7, poll=0.01, flower_every=0) == RunStatus.FAILED
    error = _get(engine, "c").error or ""
    assert error == "Flower run 7 ended finished:failed: No heartbeat received from the task"


def test_a_cancel_asked_meanwhile_stays_a_cancel(engine) -> None:  # type: ignore[no-untyped-def]
    _row(engine, "x", RunStatus.RUNNING, cancelled_by="admin key k1")
    assert follow(engine, "x", 7, poll=0.01, flower_every=0) == RunStatus.CANCELLED
    assert _get(engine, "x").error == "Cancelled by admin key k1."


def test_a_resume_is_not_reaped_for_the_worker_it_replaces(engine) -> None:  # type: ignore[no-untyped-def]
    """`fedtext federation run --run-id R --config resume=true` (or `simulate --resume`) while
    the API runs: the API's reaper judges the resuming process, not the lost worker."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a PID that is no longer alive, as the killed worker's
    _row(engine, "i", RunStatus.INTERRUPTED, owner_tenant_id="t1", worker_pid=gone.pid,
         worker_host=socket.gethostname(), checkpoint_round=1)  # fmt: skip
    assert start_run(engine, "i", config_json="{}", resume=True)
    before = _get(engine, "i").heartbeat_at
    assert reap_orphaned_runs(engine) == []
    row = _get(engine, "i")
    assert row.status == RunStatus.RUNNING and row.worker_pid == os.getpid()
    time.sleep(HEARTBEAT_SECONDS * 2.5)  # this process beats on the run while it runs here
    assert _get(engine, "i").heartbeat_at > before
    assert end_run(engine, "i", RunStatus.FAILED, "done")  # its beats stop with the run
