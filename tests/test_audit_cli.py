"""`fedtext audit report|export|verify` and `fedtext tenant budget` as a user types them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from fedtext.cli import app
from fedtext.platform import platform_from_settings
from fedtext.settings import Settings
from privacy.ledger import record_event
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
