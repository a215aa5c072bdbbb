"""privacy-unit user on the record: the gate writes the unit and k on each entry, the
chain covers the unit, and the report answers "what is the unit" from the entries."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import text
from sqlmodel import Session

from privacy.ledger import record_event, tenant_events, verify_chain
from privacy.params import DPParams
from privacy.report import build_report
from server.charging import privacy_gate
from tenancy.db import session_scope
from tenancy.platform import Platform
from tests.factories import make_tenant

PARAMS = DPParams(1.2, 0.1, 10, 1.0, 1e-5)
APPLIED = {"model": "encoder-head", "privacy_unit": "user", "max_examples_per_user": 8}


def test_a_user_level_charge_records_unit_and_k_and_the_chain_covers_them(
    platform: Platform,
) -> None:
    tenant = make_tenant(platform, "acme", budget_epsilon=50.0).tenant
    with session_scope(platform.engine) as session:
        result = privacy_gate().charge(
            session, tenant_id=tenant.id, run_id="r1", round=1,
            releases=[("train", PARAMS)], dataset="default", spec_sha256="ab" * 32,
            applied=APPLIED,
        )  # fmt: skip
        assert result.allowed
    with Session(platform.engine) as session:
        (entry,) = tenant_events(session, tenant.id)
        assert entry.privacy_unit == "user"
        assert json.loads(entry.applied_json)["max_examples_per_user"] == 8
        assert verify_chain([entry]) is None
        report = build_report(
            session, tenant_id=tenant.id, tenant_name="acme", budget_epsilon=50.0, delta=1e-5
        )
    unit = next(m for m in report.methodology if "unit of privacy" in m.question)
    assert "One user (privacy unit 'user')" in unit.answer and "k rows" in unit.answer
    # Relabelling the entry's unit is tampering: the chain check finds it.
    with platform.engine.begin() as conn:
        conn.execute(text("UPDATE privacy_event SET privacy_unit = 'example'"))
    with Session(platform.engine) as session:
        assert verify_chain(tenant_events(session, tenant.id)) is not None


def test_an_unknown_privacy_unit_is_refused(platform: Platform) -> None:
    with session_scope(platform.engine) as session, pytest.raises(ValueError, match="person"):
        record_event(
            session, tenant_id="t1", run_id="r", round=1, params=PARAMS,
            spec_sha256="ab" * 32, privacy_unit="person",
        )  # fmt: skip


def test_the_report_names_each_runs_unit_with_k_in_json_and_html(platform: Platform) -> None:
    from privacy.report_html import render_html

    tenant = make_tenant(platform, "acme", budget_epsilon=50.0).tenant
    with session_scope(platform.engine) as session:
        record_event(
            session, tenant_id=tenant.id, run_id="run-users", round=1, params=PARAMS,
            spec_sha256="ab" * 32, privacy_unit="user", applied=APPLIED,
        )  # fmt: skip
        record_event(
            session, tenant_id=tenant.id, run_id="run-rows", round=1, params=PARAMS,
            spec_sha256="ab" * 32,
        )  # fmt: skip
    with Session(platform.engine) as session:
        report = build_report(
            session, tenant_id=tenant.id, tenant_name="acme", budget_epsilon=50.0, delta=1e-5
        )
    unit = next(m for m in report.methodology if "unit of privacy" in m.question)
    assert "run-users: per user (k = 8)" in unit.answer
    assert "run-rows: per example" in unit.answer
    assert "run-users: per user (k = 8)" in report.model_dump_json()
    page = render_html(report)
    assert "mixed: per user" in page
    assert "run-users: per user (k = 8)" in page
