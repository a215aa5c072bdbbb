"""The CLI as a user types it: clear errors, no tracebacks, audit verify on a tampered DB."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from fedtext.bootstrap import platform_from_settings
from fedtext.cli import app
from fedtext.settings import Settings
from privacy.ledger import record_event
from privacy.params import DPParams
from tenancy.db import session_scope

runner = CliRunner()


def test_tenant_create_prints_the_key_once_and_refuses_bad_names(data_dir: Path) -> None:
    ok = runner.invoke(app, ["tenant", "create", "acme"])
    assert ok.exit_code == 0, ok.output
    assert "Admin key (shown once): ftk_" in ok.output
    dup = runner.invoke(app, ["tenant", "create", "acme"])
    assert dup.exit_code == 2 and "already exists" in dup.output
    bad = runner.invoke(app, ["tenant", "create", "Not Valid"])
    assert bad.exit_code == 2 and "Invalid tenant name" in bad.output
    assert "Traceback" not in bad.output
    listed = runner.invoke(app, ["tenant", "list"])
    assert "acme" in listed.output
    key = runner.invoke(app, ["keys", "create", "--tenant", "acme", "--scopes", "predict,bogus"])
    assert key.exit_code == 2 and "Unknown scope 'bogus'" in key.output
    missing = runner.invoke(app, ["keys", "create", "--tenant", "nobody"])
    assert missing.exit_code == 2 and "No tenant named 'nobody'" in missing.output


def test_placeholder_operator_token_is_refused(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDTEXT_OPERATOR_TOKEN", "changeme")
    r = runner.invoke(app, ["db", "upgrade"])
    assert r.exit_code == 2 and "placeholder" in r.output


def test_audit_verify_names_the_first_tampered_entry(data_dir: Path) -> None:
    platform = platform_from_settings(Settings(data_dir=data_dir))
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    with session_scope(platform.engine) as session:
        for rnd in (1, 2, 3):
            record_event(
                session,
                tenant_id="tenant-a",
                run_id="r",
                round=rnd,
                params=DPParams(1.0, 0.1, 10, 1.0, 1e-5),
                spec_sha256="0" * 64,
            )
    ok = runner.invoke(app, ["audit", "verify"])
    assert ok.exit_code == 0 and "1 chain(s), 3 entries intact" in ok.output
    with platform.engine.begin() as conn:
        conn.execute(text("UPDATE privacy_event SET sample_rate = 0.01 WHERE seq = 2"))
    broken = runner.invoke(app, ["audit", "verify"])
    assert broken.exit_code == 1
    assert "tenant tenant-a entry 2" in broken.output and "edited" in broken.output


def test_db_upgrade_says_whether_it_created_or_found_the_schema(data_dir: Path) -> None:
    first = runner.invoke(app, ["db", "upgrade"])
    assert first.exit_code == 0 and "Created the schema (revision " in first.output
    again = runner.invoke(app, ["db", "upgrade"])
    assert again.exit_code == 0 and "Schema is up to date (revision " in again.output


def test_a_short_operator_token_is_refused_with_a_way_to_make_one(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDTEXT_OPERATOR_TOKEN", "short")
    r = runner.invoke(app, ["db", "upgrade"])
    assert r.exit_code == 2 and "at least 32 characters" in r.output
    assert "secrets.token_urlsafe(32)" in r.output and "Value error" not in r.output
