"""`fedtext demo` refuses settings that do not fit its budget before Flower starts."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from fedtext.cli import app

runner = CliRunner()


def test_demo_over_its_budget_is_refused_before_any_progress_bar(data_dir: Path) -> None:
    # The demo's tenants have a budget of 8: a target of 9 cannot fit.
    result = runner.invoke(app, ["demo", "--epsilon", "9", "--data-dir", str(data_dir / "d")])
    assert result.exit_code == 2, result.output
    out = " ".join(result.output.split())
    assert "does not fit the privacy budget (nothing was trained or charged)" in out
    assert "tenant 'acme' would exceed budget: budget epsilon 8.000" in out
    assert "Lower --epsilon" in out
    # Refused before the federation started: no progress bar, no traceback.
    assert "Federation" not in out and "rounds (of" not in out and "Traceback" not in out
