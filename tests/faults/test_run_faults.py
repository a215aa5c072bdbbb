"""Faults during a training run started over HTTP: SIGKILL of the API and its run worker
mid-run (then resume), and PostgreSQL restarted while the run charges (the run completes).

Checks on the recorded history (the ledger): every round the run finished is charged
exactly once per participant, a round is charged twice only when it was dispatched twice
(the round in flight at the kill, re-run on resume: two releases, two charges), no
reservation is held by a run that is no longer active, the run's status is truthful, its
scratch directory is gone, and `fedtext audit verify` passes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import Session, select

from orchestration.worker import _group_alive
from privacy.ledger import PrivacyEvent
from privacy.reservations import outstanding
from runs.lifecycle import pid_alive
from runs.status import ACTIVE
from tenancy.tables import TrainingRun
from tests.factories import agree, make_tenant
from tests.faults._world import new_database, open_platform
from tests.faults.conftest import PrivateCluster, Server, audit_verify, base_env, run_cli, until

pytestmark = [pytest.mark.faults, pytest.mark.faults_full, pytest.mark.slow]

ROUNDS = 6
RUN = {
    "participants": ["globex"],
    "rounds": ROUNDS,
    "epsilon": 8.0,
    "batch_size": 16,
    "personalize_epochs": 0,
    "max_train_examples": 48,
    "max_test_examples": 16,
    "secure_mode": False,
}


@pytest.fixture
def env(pg_cluster: PrivateCluster, tmp_path: Path) -> Iterator[dict[str, str]]:
    # The workers' TMPDIR: short, Ray's socket paths must stay under 108 bytes.
    tmp = tempfile.mkdtemp(prefix="ftx-")
    yield {**base_env(new_database(pg_cluster.url), tmp_path / "data"), "TMPDIR": tmp}
    shutil.rmtree(tmp, ignore_errors=True)


def _world(env: dict[str, str]) -> dict[str, Any]:
    from fedtext.bootstrap import upgrade_schema

    platform = open_platform(env)
    upgrade_schema(platform)
    acme = make_tenant(platform, "acme", budget_epsilon=50)
    globex = make_tenant(platform, "globex", budget_epsilon=50)
    agree(platform, globex, "acme")
    platform.engine.dispose()
    return {"acme": acme, "globex": globex}


def _run(env: dict[str, str], run_id: str) -> TrainingRun:
    platform = open_platform(env)
    with Session(platform.engine) as session:
        row = session.get(TrainingRun, run_id)
        assert row is not None
        session.expunge(row)
    platform.engine.dispose()
    return row


def _killpg(pid: int | None) -> None:
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def check_history(env: dict[str, str], run_id: str, *, redispatched: set[int]) -> dict[str, Any]:
    """The ledger's promise for one run; returns what it found."""
    platform = open_platform(env)
    with Session(platform.engine) as session:
        events = list(session.exec(select(PrivacyEvent).where(PrivacyEvent.run_id == run_id)))
        active = {r.id for r in session.exec(select(TrainingRun)).all() if r.status in ACTIVE}
        run = session.get(TrainingRun, run_id)
        assert run is not None
        done = run.checkpoint_round
        ids = {e.tenant_id for e in events}
        outstanding_of = {t: outstanding(session, t, active_runs=active) for t in ids}
    platform.engine.dispose()
    per = Counter((e.tenant_id, e.round, e.purpose) for e in events)
    tenants = {e.tenant_id for e in events}
    assert len(tenants) == 2, tenants
    doubled = {k: n for k, n in per.items() if n > 1 and k[1] not in redispatched}
    assert doubled == {}, f"charged twice: {doubled}"
    lost = [(t, r) for t in tenants for r in range(1, done + 1) if per[(t, r, "train")] == 0]
    assert lost == [], f"finished rounds without a charge: {lost}"
    # A reservation of an ended run may stay as a row, but it must no longer hold: the
    # budget decisions count only active runs' reservations (privacy/reservations.py).
    if run.status not in ACTIVE:
        assert run_id not in active
        assert all(outstanding_of[t] == [] for t in tenants), outstanding_of
    return {"charges": len(events), "rounds_done": done, "tenants": len(tenants)}


def test_api_and_worker_sigkilled_mid_run_resume_without_double_charges(
    env: dict[str, str], tmp_path: Path
) -> None:
    world = _world(env)
    server = Server(env, tmp_path)
    server.start()
    run_id = ""
    try:
        server.wait_ready()
        r = httpx.post(f"{server.url}/v1/runs", json=RUN, headers=world["acme"].admin, timeout=60)
        assert r.status_code == 202, r.text
        run_id = r.json()["id"]
        until(lambda: _run(env, run_id).checkpoint_round >= 1, 300, "round 1 checkpointed")
    except BaseException:
        server.stop()
        if run_id and _run(env, run_id).worker_pid:
            _killpg(_run(env, run_id).worker_pid)
        raise
    row = _run(env, run_id)
    assert row.status in ACTIVE and row.worker_pid, row.status
    killed_at = row.checkpoint_round
    os.killpg(row.worker_pid, signal.SIGKILL)  # the worker and everything it started
    server.kill()
    fault_start = time.monotonic()
    charged_before = check_history(env, run_id, redispatched=set())
    server.start()
    recovered = server.wait_ready(120)
    try:
        # The restarted API finds the worker gone: interrupted, resumable, and says how.
        until(lambda: _run(env, run_id).status == "interrupted", 60, "run interrupted")
        body = httpx.get(f"{server.url}/v1/runs/{run_id}", headers=world["acme"].admin).json()
        assert body["status"] == "interrupted" and "--resume" in (body["error"] or ""), body
        scratch = Path(env["FEDTEXT_DATA_DIR"]) / "scratch" / run_id
        assert not scratch.exists()  # nothing tenant-derived left by the killed worker
    finally:
        server.stop()
    done = run_cli(env, "simulate", "--resume", run_id, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    row = _run(env, run_id)
    assert row.status == "completed" and row.checkpoint_round == ROUNDS, row.status
    after = check_history(env, run_id, redispatched={killed_at + 1})
    assert after["charges"] > charged_before["charges"]
    assert not (Path(env["FEDTEXT_DATA_DIR"]) / "scratch" / run_id).exists()
    audit_verify(env)
    took = time.monotonic() - fault_start
    print(
        f"FAULT run-sigkill killed_after_round={killed_at} api_recovered_s={recovered:.2f} "
        f"charges={after['charges']} fault_to_resumed_s={took:.1f}"
    )


def test_postgres_restarted_while_a_run_charges(
    pg_cluster: PrivateCluster, env: dict[str, str], tmp_path: Path
) -> None:
    """The worker rides out a short outage: its connects wait for the restarted cluster
    (orchestration/outages.py) and the run completes, every round charged once."""
    world = _world(env)
    server = Server(env, tmp_path)
    server.start()
    server.wait_ready()
    run_id = ""
    outages: list[float] = []
    try:
        r = httpx.post(f"{server.url}/v1/runs", json=RUN, headers=world["acme"].admin, timeout=60)
        assert r.status_code == 202, r.text
        run_id = r.json()["id"]
        until(lambda: _run(env, run_id).checkpoint_round >= 1, 300, "round 1 checkpointed")
        db = env["FEDTEXT_DATABASE_URL"].rsplit("/", 1)[1]
        # Three outages, 3 s apart, unless the run completed first (a run failed by one
        # is running again within seconds when its worker resumes it).
        while _run(env, run_id).status != "completed" and len(outages) < 3:
            began = time.monotonic()
            pg_cluster.terminate_backends(db)  # the worker's connections mid-charge
            pg_cluster.restart()
            outages.append(time.monotonic() - began)
            time.sleep(3.0)
        fault_end = time.monotonic()

        def ended() -> bool:
            row = _run(env, run_id)  # an outage retry is the same PID, running again
            gone = row.worker_pid is None or not pid_alive(row.worker_pid)
            return row.status == "completed" or (row.status not in ACTIVE and gone)

        until(ended, 900, "the run ends")
        took = time.monotonic() - fault_end
        final = _run(env, run_id)
        assert final.worker_pid is not None
        # Its worker exits after the ServerApp records the end (Ray's shutdown, clean-up).
        until(lambda: not _group_alive(final.worker_pid), 120, "the worker's processes gone")
        recovered = until(
            lambda: httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200, 30, "ready"
        )
    finally:
        server.stop()
        if run_id and _run(env, run_id).status in ACTIVE:
            _killpg(_run(env, run_id).worker_pid)  # a failed test leaves no worker behind
    assert outages, "the run ended before the first outage"
    # The promise: a few seconds without the database do not fail the run.
    assert final.status == "completed", (final.status, final.error)
    assert final.checkpoint_round in (0, ROUNDS)
    history = check_history(env, run_id, redispatched=set())
    assert not (Path(env["FEDTEXT_DATA_DIR"]) / "scratch" / run_id).exists()
    audit_verify(env)
    log = (Path(env["FEDTEXT_DATA_DIR"]) / "runs" / f"{run_id}.log").read_text(errors="replace")
    print(f"FAULT pg-restart-during-run outages={len(outages)} "
          f"down_s={[round(o, 1) for o in outages]} status={final.status} "
          f"resumed_after_outage={log.count('Retrying after a database outage')} "
          f"charges={history['charges']} run_ended_after_s={took:.1f} "
          f"api_recovered_s={recovered:.2f}")  # fmt: skip
