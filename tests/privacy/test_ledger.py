from __future__ import annotations

import time

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from privacy.accounting import compose_epsilon
from privacy.ledger import (
    GENESIS,
    AppendOnlyViolation,
    PrivacyEvent,
    entry_digest,
    record_event,
    spent_epsilon,
    tenant_events,
    verify_chain,
)
from privacy.params import DPParams
from tenancy.db import session_scope
from tenancy.platform import Platform

EVENTS = [DPParams(1.0 + i / 10, 0.05, 20, 1.0, 1e-5) for i in range(4)]


def fill(platform: Platform, tenant_id: str = "t1") -> None:
    with session_scope(platform.engine) as session:
        for rnd, ev in enumerate(EVENTS, start=1):
            record_event(
                session,
                tenant_id=tenant_id,
                run_id="run",
                round=rnd,
                params=ev,
                spec_sha256="ab" * 32,
            )


def events(platform: Platform, tenant_id: str = "t1") -> list[PrivacyEvent]:
    with Session(platform.engine) as session:
        return tenant_events(session, tenant_id)


def test_intact_chain_verifies_and_composes_from_raw_events(platform: Platform) -> None:
    fill(platform)
    fill(platform, "t2")
    chain = events(platform)
    assert [e.seq for e in chain] == [1, 2, 3, 4]
    assert chain[1].prev_hash == chain[0].entry_hash
    assert verify_chain(chain) is None
    with Session(platform.engine) as session:
        assert spent_epsilon(session, "t1", 1e-5) == pytest.approx(compose_epsilon(EVENTS, 1e-5))


def test_edited_entry_is_found(platform: Platform) -> None:
    fill(platform)
    with platform.engine.begin() as conn:
        conn.execute(
            text("UPDATE privacy_event SET noise_multiplier = 5.0 WHERE tenant_id='t1' AND seq=3")
        )
    problem = verify_chain(events(platform))
    assert problem is not None and problem.seq == 3 and "edited" in problem.reason


def test_deleted_entry_is_found(platform: Platform) -> None:
    fill(platform)
    with platform.engine.begin() as conn:
        conn.execute(text("DELETE FROM privacy_event WHERE tenant_id='t1' AND seq=2"))
    problem = verify_chain(events(platform))
    assert problem is not None and problem.seq == 3 and "deleted" in problem.reason


def test_reordered_entries_are_found(platform: Platform) -> None:
    fill(platform)
    with platform.engine.begin() as conn:
        conn.execute(text("UPDATE privacy_event SET seq = 99 WHERE tenant_id='t1' AND seq=2"))
        conn.execute(text("UPDATE privacy_event SET seq = 2 WHERE tenant_id='t1' AND seq=3"))
        conn.execute(text("UPDATE privacy_event SET seq = 3 WHERE tenant_id='t1' AND seq=99"))
    problem = verify_chain(events(platform))
    assert problem is not None and problem.seq == 2


def test_rewritten_chain_tail_is_found_from_the_hash(platform: Platform) -> None:
    fill(platform)
    # An attacker who edits an entry and recomputes its own hash still breaks the next link.
    ev = events(platform)[1]
    ev.steps = 1
    forged = entry_digest(ev)
    with platform.engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE privacy_event SET steps = 1, entry_hash = :h WHERE tenant_id='t1' AND seq=2"
            ),
            {"h": forged},
        )
    problem = verify_chain(events(platform))
    assert problem is not None and problem.seq == 3 and "link" in problem.reason


def test_orm_refuses_to_update_or_delete_an_entry(platform: Platform) -> None:
    fill(platform)
    with Session(platform.engine) as session:
        ev = tenant_events(session, "t1")[0]
        ev.noise_multiplier = 9.0
        session.add(ev)
        with pytest.raises(AppendOnlyViolation, match="append-only"):
            session.commit()
    with Session(platform.engine) as session:
        session.delete(tenant_events(session, "t1")[0])
        with pytest.raises(AppendOnlyViolation):
            session.commit()
    assert [e.noise_multiplier for e in events(platform)] == [e.noise_multiplier for e in EVENTS]


def test_entries_carry_dataset_and_every_field_of_the_issue(platform: Platform) -> None:
    with session_scope(platform.engine) as session:
        record_event(
            session,
            tenant_id="t1",
            run_id="r",
            round=1,
            params=EVENTS[0],
            spec_sha256="cd" * 32,
            dataset="tickets-2024",
        )
    (ev,) = events(platform)
    assert ev.dataset == "tickets-2024" and ev.privacy_unit == "example"
    assert ev.accountant == "prv" and ev.accountant_version.startswith("opacus-")
    assert ev.fedtext_version and ev.spec_sha256 == "cd" * 32 and ev.prev_hash == GENESIS
    assert ev.created_at.tzinfo is not None and ev.created_at.microsecond == 0
    assert "dataset" in PrivacyEvent.HASHED
    with platform.engine.begin() as conn:
        conn.execute(text("UPDATE privacy_event SET dataset = 'other' WHERE tenant_id='t1'"))
    problem = verify_chain(events(platform))
    assert problem is not None and "edited" in problem.reason
    with Session(platform.engine) as session, pytest.raises(ValueError, match="dataset name"):
        record_event(
            session, tenant_id="t1", run_id="r", round=2, params=EVENTS[0],
            spec_sha256="cd" * 32, dataset="no spaces/please",
        )  # fmt: skip


def test_hash_does_not_depend_on_the_local_time_zone(
    platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(platform)
    monkeypatch.setenv("TZ", "Pacific/Kiritimati")  # UTC+14: any local-time slip shows
    time.tzset()
    try:
        assert verify_chain(events(platform)) is None
    finally:
        monkeypatch.undo()
        time.tzset()


def test_concurrent_writers_cannot_fork_a_chain(platform: Platform) -> None:
    fill(platform)
    with platform.engine.begin() as conn, pytest.raises(IntegrityError):
        conn.execute(
            text(
                "INSERT INTO privacy_event (tenant_id, dataset, seq, run_id, round, created_at, "
                "privacy_unit, mechanism, noise_multiplier, sample_rate, steps, clip_norm, "
                "delta, accountant, accountant_version, fedtext_version, spec_sha256, "
                "prev_hash, entry_hash) SELECT tenant_id, dataset, seq, run_id, round, "
                "created_at, privacy_unit, mechanism, noise_multiplier, sample_rate, steps, "
                "clip_norm, delta, accountant, accountant_version, fedtext_version, "
                "spec_sha256, prev_hash, entry_hash FROM privacy_event WHERE seq = 4"
            )
        )
