from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlmodel import Session

from privacy.accounting import compose_epsilon
from privacy.ledger import PrivacyEvent, record_event, spent_epsilon, tenant_events, verify_chain
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
    with Session(platform.engine) as session:
        ev = tenant_events(session, "t1")[1]
        ev.steps = 1
        from privacy.ledger import entry_digest

        ev.entry_hash = entry_digest(ev)
        session.add(ev)
        session.commit()
    problem = verify_chain(events(platform))
    assert problem is not None and problem.seq == 3 and "link" in problem.reason
