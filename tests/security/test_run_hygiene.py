"""Run hygiene (issue 24, findings 8, 9, 10): cancels, scratch files, stale checkpoints,
shredding that leaves no wrapped data key in the database file.

The fast tests drive the transitions and the operator surfaces (HTTP app, `fedtext` CLI in
a subprocess) on a real database; tests/serving/test_run_hygiene_live.py cancels real
workers.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from orchestration.worker import LocalRunLauncher
from runs.lifecycle import (
    cancel_run,
    claim_run,
    end_run,
    fail_run,
    get_run,
    new_run,
    reap_orphaned_runs,
    request_cancel,
    start_run,
    withdraw_cancel,
)
from runs.status import RunStatus
from server.checkpoint import save_checkpoint
from serving.app import create_app
from serving.config import ServingConfig
from tenancy.db import get_engine
from tenancy.errors import NotFound
from tenancy.key_providers import FileKeyProvider
from tenancy.keyring import Keyring
from tenancy.platform import Platform
from tenancy.tables import DataKey, TrainingRun
from tests.factories import make_tenant

OPERATOR = "op-" + "x" * 40


def _add(platform: Platform, **fields: object) -> str:
    run = new_run(**fields)
    with Session(platform.engine) as session:
        session.add(run)
        session.commit()
        return run.id


def _gone_worker(platform: Platform, run_id: str) -> None:
    """The run's worker has exited (its PID is free): what the reaper sees after a kill."""
    with Session(platform.engine) as session:
        row = session.get(TrainingRun, run_id)
        assert row is not None
        row.worker_pid, row.worker_host = 2**22 + 4321, socket.gethostname()
        session.add(row)
        session.commit()


# ------------------------------------------------------------------ cancels (finding 10)


def test_a_cancel_is_recorded_as_cancelled_whatever_ends_the_worker_meanwhile(
    platform: Platform,
) -> None:
    """The race of the finding, each interleaving forced: the reaper (worker gone) or the
    worker's own failure lands between the stop and the cancel's end. On old main the
    first of them won: 'interrupted' (offered for resume) or 'failed'."""
    acme = make_tenant(platform, "acme")
    for late_end in ("reaper", "worker failure", "worker interrupted"):
        run_id = _add(platform, owner_tenant_id=acme.tenant.id, simulation_json="{}")
        assert claim_run(platform.engine, run_id) is not None
        assert request_cancel(platform.engine, run_id, "admin key abc")
        _gone_worker(platform, run_id)  # the stop killed it
        if late_end == "reaper":
            assert reap_orphaned_runs(platform.engine) == [run_id]
        elif late_end == "worker failure":
            assert fail_run(platform.engine, run_id, "Ray actor died")
        else:
            assert end_run(platform.engine, run_id, RunStatus.INTERRUPTED, "gone")
        cancel_run(platform.engine, run_id, "admin key abc")
        run = get_run(platform.engine, run_id)
        assert run is not None
        assert (run.status, run.cancelled_by) == ("cancelled", "admin key abc"), late_end
        assert run.error == "Cancelled by admin key abc.", late_end
        assert "resume" not in (run.error or "").lower()
        # Never resumed, never restarted.
        assert not start_run(platform.engine, run_id, config_json="{}", resume=True)
        assert get_run(platform.engine, run_id).status == "cancelled"  # type: ignore[union-attr]


def test_a_cancel_asked_stops_the_server_app_and_only_one_is_asked(platform: Platform) -> None:
    from runs.lifecycle import is_cancelled

    run_id = _add(platform)
    assert request_cancel(platform.engine, run_id, "admin key abc")
    assert is_cancelled(platform.engine, run_id)  # the ServerApp stands down at its next round
    assert not start_run(platform.engine, run_id, config_json="{}", resume=False)
    assert not request_cancel(platform.engine, run_id, "admin key def")  # one at a time
    # A stop the federation did not confirm: the request is withdrawn, the run goes on.
    withdraw_cancel(platform.engine, run_id)
    assert not is_cancelled(platform.engine, run_id)
    # An ended run is not cancelled; a completed one stays completed.
    done = _add(platform)
    end_run(platform.engine, done, RunStatus.COMPLETED, "")
    assert not request_cancel(platform.engine, done, "admin key abc")
    assert not cancel_run(platform.engine, done, "admin key abc")
    assert get_run(platform.engine, done).status == "completed"  # type: ignore[union-attr]


def test_a_cancelled_simulation_is_not_resumed(platform: Platform) -> None:
    from orchestration.simulation import SimulationFailed, resume

    run_id = _add(platform, simulation_json='{"tenants": ["acme", "globex"]}')
    cancel_run(platform.engine, run_id, "admin key abc")
    with pytest.raises(SimulationFailed, match="was cancelled; a cancelled run is not resumed"):
        resume(platform, run_id)


# -------------------------------------------------------------- scratch files (finding 8)


def test_the_launcher_sweeps_scratch_directories_of_runs_that_are_not_active(
    sqlite_platform: Platform, tmp_path: Path
) -> None:
    platform = sqlite_platform
    root = tmp_path / "scratch"
    active = _add(platform)
    ended = _add(platform)
    interrupted = _add(platform)
    end_run(platform.engine, ended, RunStatus.CANCELLED, "x")
    end_run(platform.engine, interrupted, RunStatus.INTERRUPTED, "worker killed")
    for name in (active, ended, interrupted, "unknown-run"):
        (root / name).mkdir(parents=True)
        (root / name / "vectors.safetensors").write_bytes(b"derived from tenants' text")
    launcher = LocalRunLauncher(platform, tmp_path / "runs", root)  # a restart sweeps
    assert sorted(p.name for p in root.iterdir()) == [active]
    # Stopping a worker removes its run's directory (a SIGKILLed worker runs no finally).
    launcher.cancel(active, None)
    assert list(root.iterdir()) == []
    assert launcher.env["FEDTEXT_WORKER_SCRATCH_DIR"] == str(root.resolve())


# ------------------------------------------------- checkpoints and shredding (finding 9)


def _checkpoint(platform: Platform, run_id: str) -> str:
    with Session(platform.engine, expire_on_commit=False) as session:
        run = session.get(TrainingRun, run_id)
        assert run is not None
        save_checkpoint(platform, run, 1, b"weights trained on tenants' data")
        session.add(run)
        session.commit()
        assert run.checkpoint_blob is not None
        return run.checkpoint_blob


def test_rotation_drops_cancelled_checkpoints_and_reencrypts_the_others(
    platform: Platform,
) -> None:
    from server.checkpoint import load_checkpoint
    from tenancy.rotation import rotate_kek

    make_tenant(platform, "acme")
    cancelled, interrupted, running = _add(platform), _add(platform), _add(platform)
    for run_id in (cancelled, interrupted, running):
        _checkpoint(platform, run_id)
    cancel_run(platform.engine, cancelled, "admin key abc")
    end_run(platform.engine, interrupted, RunStatus.INTERRUPTED, "worker killed")
    start_run(platform.engine, running, config_json="{}", resume=False)
    old_blob = get_run(platform.engine, cancelled).checkpoint_blob  # type: ignore[union-attr]
    done = rotate_kek(platform.engine, platform.keyring, grace_seconds=0, store=platform.store)
    assert (done.dropped_checkpoints, done.reencrypted_checkpoints) == (1, 1)
    assert done.kept == [1]  # only the run still writing its checkpoints keeps version 1
    gone = get_run(platform.engine, cancelled)
    assert gone is not None and gone.checkpoint_blob is None
    with pytest.raises(NotFound):
        platform.store.get(str(old_blob))
    kept = get_run(platform.engine, interrupted)
    assert kept is not None and kept.checkpoint_kek_version == 2
    assert load_checkpoint(platform, kept) == b"weights trained on tenants' data"
    # Once that run ends, the next rotation retires version 1 as well.
    end_run(platform.engine, running, RunStatus.FAILED, "x")
    again = rotate_kek(platform.engine, platform.keyring, grace_seconds=0, store=platform.store)
    assert again.kept == [] and 1 in again.retired


def test_deletion_leaves_no_wrapped_data_key_in_the_sqlite_files(
    sqlite_platform: Platform, tmp_path: Path
) -> None:
    """The finding: right after deletion the wrapped key was still in the -wal file (and
    the freed space of the .db file)."""
    platform = sqlite_platform
    acme = make_tenant(platform, "acme")
    make_tenant(platform, "globex")
    with Session(platform.engine) as session:
        wrapped = session.exec(select(DataKey.wrapped).where(DataKey.tenant_id == acme.tenant.id))
        key_bytes = wrapped.one()
    db = tmp_path / "fedtext.db"
    files = [db, Path(f"{db}-wal")]
    assert any(key_bytes in f.read_bytes() for f in files if f.exists())  # the test can see it
    app = create_app(platform, ServingConfig(operator_token=OPERATOR))
    with TestClient(app) as client:
        r = client.delete(
            f"/v1/tenants/{acme.tenant.id}", headers={"Authorization": f"Bearer {OPERATOR}"}
        )
        assert r.status_code == 200, r.text
        assert r.json()["destroyed_data_keys"] == 1
        for f in files:
            if f.exists():
                assert key_bytes not in f.read_bytes(), f.name
                assert key_bytes[:16] not in f.read_bytes(), f.name


def test_postgresql_deletion_overwrites_the_wrapped_key_before_deleting_it(
    platform: Platform,
) -> None:
    """What can be checked from SQL: the row's last version held random bytes, not the key
    (the old version stays in the heap until VACUUM; docs/SECURITY.md)."""
    from sqlalchemy import event

    from tenancy.rotation import delete_tenant

    acme = make_tenant(platform, "acme")
    with Session(platform.engine) as session:
        key_bytes = session.exec(
            select(DataKey.wrapped).where(DataKey.tenant_id == acme.tenant.id)
        ).one()
    statements: list[tuple[str, object]] = []

    def seen(_conn, _cursor, statement, parameters, _context, _many):  # type: ignore[no-untyped-def]
        statements.append((statement, parameters))

    event.listen(platform.engine, "before_cursor_execute", seen)
    try:
        delete_tenant(platform.engine, platform.keyring, platform.store, tenant_id=acme.tenant.id)
    finally:
        event.remove(platform.engine, "before_cursor_execute", seen)
    writes = [
        (s.split()[0], p) for s, p in statements if "data_key" in s and not s.startswith("SELECT")
    ]
    assert [w for w, _ in writes] == ["UPDATE", "DELETE"], writes
    assert key_bytes not in repr(writes[0][1]).encode()


def test_cli_deletion_then_rotation_leaves_a_backup_undecryptable(
    data_dir: Path, tmp_path: Path
) -> None:
    """The finding: a cancelled run's checkpoint kept KEK version 1 in use (rotation
    'kept: 1'), so a database backup taken before the deletion still unwrapped the
    deleted tenant's data key."""
    from fedtext.bootstrap import platform_from_settings, upgrade_schema
    from fedtext.settings import Settings

    platform = platform_from_settings(Settings(data_dir=data_dir))
    upgrade_schema(platform)
    acme = make_tenant(platform, "acme")
    make_tenant(platform, "globex")
    run_id = _add(platform, simulation_json='{"tenants": ["globex", "initech"]}')
    _checkpoint(platform, run_id)  # a run acme was not part of
    cancel_run(platform.engine, run_id, "admin key abc")
    # The backup: the database as it was before the deletion.
    get_engine(str(platform.engine.url)).dispose()
    backup = tmp_path / "backup.db"
    with Session(platform.engine) as session:
        session.connection().exec_driver_sql(f"VACUUM INTO '{backup}'")
    platform.engine.dispose()

    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "fedtext.cli", *args],
            capture_output=True,
            text=True,
            timeout=180,
            env={**os.environ, "FEDTEXT_DATA_DIR": str(data_dir)},
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    # What a worker killed while no API ran left behind for that (now cancelled) run.
    stale = data_dir / "scratch" / run_id
    stale.mkdir(parents=True)
    (stale / "vectors.safetensors").write_bytes(b"derived from tenants' text")
    cli("tenant", "delete", "acme", "--yes")
    assert not stale.exists()
    out = " ".join(cli("keys", "rotate-kek", "--grace", "0").split())
    assert "retired: 1" in out and "kept (still used by run checkpoints): none" in out, out
    # The backup's wrapped key is useless: the KEK version that wrapped it is gone.
    provider = FileKeyProvider(Settings(data_dir=data_dir).resolved_kek_file)
    assert provider.versions() == [2]
    with Session(get_engine(f"sqlite:///{backup}")) as session:
        row = session.exec(select(DataKey).where(DataKey.tenant_id == acme.tenant.id)).one()
        assert row.kek_version == 1
        with pytest.raises(Exception):  # noqa: B017 - whichever error the provider raises
            Keyring(provider).data_key(session, acme.tenant.id)
    shutil.rmtree(data_dir / "blobs", ignore_errors=True)
