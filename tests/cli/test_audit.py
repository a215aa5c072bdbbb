"""`fedtext audit report|export|verify` and `fedtext tenant budget` as a user types them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from fedtext.bootstrap import platform_from_settings
from fedtext.cli import app
from fedtext.settings import Settings
from privacy.ledger import GENESIS, entry_digest, record_event, tenant_events
from privacy.params import DPParams
from tenancy.db import session_scope
from tenancy.tenants import get_tenant

runner = CliRunner()


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FEDTEXT_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("FEDTEXT_DATABASE_URL", raising=False)
    assert runner.invoke(app, ["tenant", "create", "acme", "--budget-epsilon", "6"]).exit_code == 0
    platform = platform_from_settings(Settings(data_dir=tmp_path))
    with session_scope(platform.engine) as session:
        tenant = get_tenant(session=session, name="acme")
        for rnd in (1, 2):
            record_event(
                session,
                tenant_id=tenant.id,
                run_id="r1",
                round=rnd,
                params=DPParams(1.2, 0.05, 20, 1.0, 1e-5),
                spec_sha256="0" * 64,
            )
    return tmp_path


def test_report_export_and_budget_from_the_cli(data_dir: Path) -> None:
    html = runner.invoke(
        app, ["audit", "report", "--tenant", "acme", "--out", str(data_dir / "a.html")]
    )
    assert html.exit_code == 0, html.output
    assert "chains intact" in html.output
    page = (data_dir / "a.html").read_text()
    assert "<svg" in page and "Methodology" in page
    out = runner.invoke(
        app, ["audit", "report", "--tenant", "acme", "--out", str(data_dir / "a.json")]
    )
    assert out.exit_code == 0
    rep = json.loads((data_dir / "a.json").read_text())
    assert rep["events"] == 2 and rep["budget_epsilon"] == 6.0

    raised = runner.invoke(
        app, ["tenant", "budget", "acme", "--epsilon", "9", "--reason", "renewal"]
    )
    assert raised.exit_code == 0, raised.output
    # Change 1 is the budget the tenant was created with.
    assert "from 6 to 9" in raised.output and "budget change 2" in raised.output
    verify = runner.invoke(app, ["audit", "verify"])
    assert verify.exit_code == 0 and "2 budget change(s) intact" in verify.output

    exp = runner.invoke(
        app, ["audit", "export", "--out", str(data_dir / "l.csv"), "--format", "csv"]
    )
    assert exp.exit_code == 0 and "2 entries of 1 tenant(s)" in exp.output
    lines = (data_dir / "l.csv").read_text().splitlines()
    assert lines[0].startswith("tenant_id,dataset,seq") and len(lines) == 3


def test_user_mistakes_are_clear_errors_without_tracebacks(data_dir: Path) -> None:
    cases = [
        (["audit", "report", "--tenant", "nobody", "--out", "x.html"], "No tenant named 'nobody'"),
        (["audit", "report", "--tenant", "acme", "--out", "x", "--format", "pdf"],
         "Unknown report format"),
        (["audit", "export", "--out", "x", "--format", "xml"], "Unknown export format"),
        (["tenant", "budget", "acme", "--epsilon", "-1", "--reason", "x"], "positive"),
        (["tenant", "budget", "acme", "--epsilon", "2", "--reason", " "], "--reason"),
        (["tenant", "budget", "acme", "--epsilon", "2", "--reason", "x", "--dataset", "a b"],
         "Invalid dataset name"),
        (["audit", "canary", "--canaries", "1"], "at least two canaries"),
        (["audit", "canary", "--confidence", "1.5"], "confidence"),
    ]  # fmt: skip
    for args, message in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        assert message in r.output and "Traceback" not in r.output


def test_verify_names_a_tampered_budget_change(data_dir: Path) -> None:
    assert (
        runner.invoke(
            app, ["tenant", "budget", "acme", "--epsilon", "9", "--reason", "a"]
        ).exit_code
        == 0
    )
    assert (
        runner.invoke(
            app, ["tenant", "budget", "acme", "--epsilon", "10", "--reason", "b"]
        ).exit_code
        == 0
    )
    platform = platform_from_settings(Settings(data_dir=data_dir))
    with platform.engine.begin() as conn:
        conn.execute(text("DELETE FROM privacy_budget_change WHERE seq = 1"))
    r = runner.invoke(app, ["audit", "verify"])
    assert r.exit_code == 1 and "budget change 2" in r.output and "deleted" in r.output
    rep = runner.invoke(
        app, ["audit", "report", "--tenant", "acme", "--out", str(data_dir / "r.json")]
    )
    assert rep.exit_code == 1 and "BROKEN" in rep.output


# --- Signed heads: each tamper of the review is detected given the exported head ----------


def _export_heads(data_dir: Path) -> Path:
    out = data_dir / "ledger.jsonl"
    r = runner.invoke(app, ["audit", "export", "--out", str(out)])
    assert r.exit_code == 0, r.output
    heads = data_dir / "ledger.jsonl.heads.json"
    assert heads.exists() and "signed heads" in r.output
    return heads


def _sql(data_dir: Path, *statements: str) -> None:
    platform = platform_from_settings(Settings(data_dir=data_dir))
    with platform.engine.begin() as conn:
        for statement in statements:
            conn.execute(text(statement))


def _verify(heads: Path | None = None) -> Any:
    return runner.invoke(app, ["audit", "verify", *(["--head", str(heads)] if heads else [])])


def test_verify_with_the_exported_head_passes_on_an_intact_ledger(data_dir: Path) -> None:
    heads = _export_heads(data_dir)
    data = json.loads(heads.read_text())
    assert data["format"] == "fedtext-signed-heads/1"
    head = data["heads"][0]["head"]
    assert head["ledger_seq"] == 2 and head["budget_seq"] == 1 and head["budget_epsilon"] == 6.0
    r = _verify(heads)
    assert r.exit_code == 0, r.output
    assert "1 kept head(s) consistent" in r.output


def test_a_deleted_tail_is_detected_against_the_head(data_dir: Path) -> None:
    heads = _export_heads(data_dir)
    _sql(data_dir, "DELETE FROM privacy_event WHERE seq = 2")
    assert _verify().exit_code == 1  # the stored signed head catches it too
    _sql(data_dir, "DELETE FROM privacy_signed_head")  # ... unless it is deleted as well
    assert _verify().exit_code == 0
    r = _verify(heads)
    assert r.exit_code == 1 and "entries were deleted" in r.output


def test_deleting_everything_of_a_tenant_is_detected(data_dir: Path) -> None:
    heads = _export_heads(data_dir)
    _sql(
        data_dir,
        "DELETE FROM privacy_event",
        "DELETE FROM privacy_budget_change",
        "DELETE FROM privacy_signed_head",
        "DELETE FROM privacy_ledger_head",
    )
    r = _verify(heads)
    assert r.exit_code == 1
    assert "ledger has 0 entries, the signed head 2" in r.output
    assert "budget chain has 0 entries" in r.output


def test_a_budget_edited_outside_the_record_is_detected_and_refused(data_dir: Path) -> None:
    heads = _export_heads(data_dir)
    _sql(data_dir, "UPDATE tenant SET budget_epsilon = 1000")
    r = _verify()
    assert r.exit_code == 1 and "differs from its budget chain" in r.output
    r = _verify(heads)
    assert r.exit_code == 1 and "edited outside the record" in r.output
    # The budget gate does not spend the edited budget either.
    from privacy.budget import check_release

    platform = platform_from_settings(Settings(data_dir=data_dir))
    with session_scope(platform.engine) as session:
        tenant = get_tenant(session=session, name="acme")
        decision = check_release(
            session, tenant=tenant, dataset="default", new_events=[DPParams(5.0, 0.01, 1, 1, 1e-5)]
        )
    assert not decision.allowed and "changed outside the record" in decision.reason


def test_deleting_the_last_budget_change_is_detected(data_dir: Path) -> None:
    assert (
        runner.invoke(
            app, ["tenant", "budget", "acme", "--epsilon", "9", "--reason", "renewal"]
        ).exit_code
        == 0
    )
    heads = _export_heads(data_dir)
    # Remove the raise and put the old figure back on the tenant row: the chain is intact.
    _sql(
        data_dir,
        "DELETE FROM privacy_budget_change WHERE seq = 2",
        "UPDATE tenant SET budget_epsilon = 6",
        "DELETE FROM privacy_signed_head",
    )
    assert _verify().exit_code == 0  # nothing inside the database shows it
    r = _verify(heads)
    assert r.exit_code == 1 and "budget chain has 1 entries, the signed head 2" in r.output


def test_an_edited_and_rehashed_chain_is_detected(data_dir: Path) -> None:
    heads = _export_heads(data_dir)
    platform = platform_from_settings(Settings(data_dir=data_dir))
    # An attacker with database access lowers a noise-free figure and re-hashes every link.
    with session_scope(platform.engine) as session:
        tenant = get_tenant(session=session, name="acme")
        events = tenant_events(session, tenant.id)
    prev = GENESIS
    for ev in events:
        ev.noise_multiplier = 5.0 if ev.seq == 1 else ev.noise_multiplier
        ev.prev_hash = prev
        ev.entry_hash = entry_digest(ev)
        prev = ev.entry_hash
        _sql(
            data_dir,
            f"UPDATE privacy_event SET noise_multiplier = {ev.noise_multiplier!r}, "
            f"prev_hash = '{ev.prev_hash}', entry_hash = '{ev.entry_hash}' WHERE id = {ev.id}",
        )
    _sql(data_dir, "DELETE FROM privacy_signed_head")
    # The chain alone is consistent again, but its signatures (v0006) no longer verify.
    r = _verify()
    assert r.exit_code == 1 and "ledger entry 1" in r.output
    assert "signature does not verify" in r.output
    r = _verify(heads)
    assert r.exit_code == 1 and "the chain was rewritten" in r.output


def test_an_altered_head_file_is_refused(data_dir: Path) -> None:
    heads = _export_heads(data_dir)
    data = json.loads(heads.read_text())
    data["heads"][0]["head"]["ledger_seq"] = 1  # make a truncation look expected
    heads.write_text(json.dumps(data))
    r = _verify(heads)
    assert r.exit_code == 1 and "signature is not valid" in r.output
    heads.write_text("{}")
    r = _verify(heads)
    assert r.exit_code == 2 and "no signed head" in r.output


def test_the_report_carries_a_signed_head_and_checks_the_last_one(data_dir: Path) -> None:
    out = data_dir / "r.json"
    first = runner.invoke(app, ["audit", "report", "--tenant", "acme", "--out", str(out)])
    assert first.exit_code == 0, first.output
    rep = json.loads(out.read_text())
    assert rep["signed_head"]["head"]["ledger_seq"] == 2
    assert rep["chain"]["checked_head_at"] is None  # nothing signed before
    assert _verify(out).exit_code == 0  # a JSON report is a head file too
    _sql(data_dir, "DELETE FROM privacy_event WHERE seq = 2")
    second = runner.invoke(app, ["audit", "report", "--tenant", "acme", "--out", str(out)])
    assert second.exit_code == 1 and "BROKEN" in second.output
    rep = json.loads(out.read_text())
    assert any("deleted" in p for p in rep["chain"]["head_problems"])
