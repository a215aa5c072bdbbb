"""Run transitions: every status write is conditional where a concurrent end must win."""

from __future__ import annotations

import os
import socket

from sqlmodel import Session

from runs.lifecycle import (
    cancel_run,
    claim_run,
    complete_run,
    end_run,
    fail_run,
    get_run,
    new_run,
    reap_orphaned_runs,
    start_run,
)
from runs.status import ACTIVE, FINISHED, RunStatus
from tenancy.platform import Platform
from tests.factories import make_tenant


def _add(platform: Platform, **fields: object) -> str:
    run = new_run(**fields)
    with Session(platform.engine) as session:
        session.add(run)
        session.commit()
        return run.id


def test_statuses_split_into_active_and_finished() -> None:
    assert set(ACTIVE) | set(FINISHED) == set(RunStatus)
    assert not set(ACTIVE) & set(FINISHED)
    assert RunStatus.RUNNING.active and RunStatus.CANCELLED.finished


def test_a_cancel_is_kept_against_a_late_failure_and_a_late_start(platform: Platform) -> None:
    run_id = _add(platform)
    assert cancel_run(platform.engine, run_id, "admin key x")
    assert not fail_run(platform.engine, run_id, "the worker died")
    assert not start_run(platform.engine, run_id, config_json="{}", resume=False)
    run = get_run(platform.engine, run_id)
    assert run is not None and (run.status, run.error) == ("cancelled", "Cancelled by admin key x.")
    assert run.cancelled_by == "admin key x"
    # A cancel is final: the run is not resumed (its checkpoint is dropped).
    assert not start_run(platform.engine, run_id, config_json="{}", resume=True)
    assert get_run(platform.engine, run_id).status == RunStatus.CANCELLED  # type: ignore[union-attr]


def test_an_ended_run_is_not_cancelled_and_a_completion_records_its_summary(
    platform: Platform,
) -> None:
    run_id = _add(platform)
    complete_run(platform.engine, run_id, summary_json='{"tenants": {}}')
    assert not cancel_run(platform.engine, run_id, "too late")
    assert not end_run(platform.engine, run_id, RunStatus.INTERRUPTED, "gone")
    run = get_run(platform.engine, run_id)
    assert run is not None and run.status == "completed" and run.finished_at is not None
    assert run.summary_json == '{"tenants": {}}' and run.error is None


def test_the_reaper_interrupts_only_runs_whose_worker_is_gone(platform: Platform) -> None:
    acme = make_tenant(platform, "acme")
    gone = _add(platform, owner_tenant_id=acme.tenant.id, simulation_json="{}")
    alive = _add(platform, owner_tenant_id=acme.tenant.id, simulation_json="{}")
    claimed = claim_run(platform.engine, alive)
    assert claimed is not None and claimed.worker_pid == os.getpid()
    with Session(platform.engine) as session:
        row = session.get(type(claimed), gone)
        assert row is not None
        row.worker_pid, row.worker_host = 2**22 + 12345, socket.gethostname()  # no such PID
        session.add(row)
        session.commit()
    assert reap_orphaned_runs(platform.engine) == [gone]
    assert get_run(platform.engine, gone).status == RunStatus.INTERRUPTED  # type: ignore[union-attr]
    assert get_run(platform.engine, alive).status == RunStatus.CREATED  # type: ignore[union-attr]
    assert reap_orphaned_runs(platform.engine) == []  # reaping twice changes nothing
