"""The run worker's protections against a short database outage (orchestration/outages.py), each
checked on its own: connects wait out a restarted PostgreSQL, and a failed run is resumed
only when the resume charges no committed round again. The whole path (a run charging
while PostgreSQL restarts) is test_run_faults.py::test_postgres_restarted_while_a_run_charges.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, SQLModel

from orchestration.outages import Outages, is_connection_error, retry_blocker
from privacy.ledger import PrivacyEvent
from runs.lifecycle import reopen_for_retry
from runs.status import RunStatus
from tenancy.tables import TrainingRun
from tests.faults._world import new_database
from tests.faults.conftest import PrivateCluster

pytestmark = pytest.mark.faults

LOST = "(psycopg2.OperationalError) server closed the connection unexpectedly"


def _ask(engine: object) -> int:
    with engine.connect() as conn:  # type: ignore[attr-defined]
        return int(conn.execute(text("SELECT 1")).scalar_one())


def test_connects_wait_out_a_restarted_cluster(pg_cluster: PrivateCluster) -> None:
    url = new_database(pg_cluster.url)
    waits = create_engine(url, pool_pre_ping=True)
    outages = Outages.watch(waits, patience=60)
    bare = create_engine(url, pool_pre_ping=True)  # the same engine without the protection
    assert _ask(waits) == 1 and _ask(bare) == 1
    pg_cluster.stop("immediate")  # a crash: every pooled connection dies
    back = threading.Timer(3.0, pg_cluster.start)
    back.start()
    try:
        with pytest.raises(OperationalError) as refused:
            _ask(bare)
        assert is_connection_error(str(refused.value)), refused.value
        started = time.monotonic()
        assert _ask(waits) == 1  # the pre-ping drops the dead connection; the connect waits
        waited = time.monotonic() - started
    finally:
        back.join()
    assert outages.seen >= 1 and is_connection_error(outages.last), outages
    assert waited > 0.5, waited  # it did wait for the cluster (not a pooled survivor)
    waits.dispose()
    bare.dispose()
    print(f"OUTAGE connect waited {waited:.1f} s through a restart; seen={outages.seen}")


def test_connects_give_up_after_their_patience(pg_cluster: PrivateCluster) -> None:
    url = new_database(pg_cluster.url)
    engine = create_engine(url, pool_pre_ping=True)
    Outages.watch(engine, patience=2)
    pg_cluster.stop("fast")
    try:
        started = time.monotonic()
        with pytest.raises(OperationalError):
            _ask(engine)
        assert 1.0 < time.monotonic() - started < 10
    finally:
        pg_cluster.start()
    engine.dispose()


def test_errors_that_are_not_a_lost_connection_are_not_retried() -> None:
    assert is_connection_error("FATAL:  the database system is not yet accepting connections")
    assert is_connection_error(LOST)
    assert not is_connection_error('FATAL:  password authentication failed for user "x"')
    assert not is_connection_error('relation "training_run" does not exist')
    assert not is_connection_error("round 1: 1 valid replies of 2, fewer than min-nodes 2")


def _event(run_id: str, round_: int) -> PrivacyEvent:
    return PrivacyEvent(
        tenant_id="t1", seq=round_, run_id=run_id, round=round_,
        created_at=datetime.now(UTC), mechanism="gaussian", noise_multiplier=1.0,
        sample_rate=0.1, steps=1, clip_norm=1.0, delta=1e-5, accountant="prv",
        accountant_version="1", fedtext_version="1", spec_sha256="0" * 64,
        prev_hash="0" * 64, entry_hash="1" * 64,
    )  # fmt: skip


def test_a_failed_run_is_retried_only_when_no_committed_round_would_be_charged_again(
    tmp_path: Path,
) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    SQLModel.metadata.create_all(
        engine,
        tables=[TrainingRun.__table__, PrivacyEvent.__table__],  # type: ignore[attr-defined]
    )
    seen = Outages(seen=1, last=LOST)
    with Session(engine) as session:
        session.add(TrainingRun(id="r", status=RunStatus.FAILED, error=LOST, checkpoint_round=1))
        session.add(_event("r", 1))  # round 1 finished and charged
        session.commit()
    assert retry_blocker(engine, "r", Outages()) == "no lost database connection was seen"
    assert retry_blocker(engine, "r", seen) is None  # round 2 was never charged
    with Session(engine) as session:
        session.add(_event("r", 2))  # round 2 charged before the connection was lost
        session.commit()
    why = retry_blocker(engine, "r", seen)
    assert why is not None and why.startswith("round 2 was charged"), why
    # Another kind of failure, or a cancel asked meanwhile: never retried.
    with Session(engine) as session:
        session.add(TrainingRun(id="q", status=RunStatus.FAILED, error="3 eligible tenants"))
        session.add(TrainingRun(id="c", status=RunStatus.FAILED, error=LOST, cancelled_by="k"))
        session.commit()
    assert "another reason" in (retry_blocker(engine, "q", seen) or "")
    assert retry_blocker(engine, "c", seen) == "it was cancelled"
    assert not reopen_for_retry(engine, "c", "retrying")  # a cancel is final
    assert reopen_for_retry(engine, "r", "Retrying after a database outage")
    with Session(engine) as session:
        row = session.get(TrainingRun, "r")
        assert row is not None and row.status == RunStatus.RUNNING and row.finished_at is None
