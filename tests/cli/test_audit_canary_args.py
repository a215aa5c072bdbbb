"""`fedtext audit canary`'s user-level options refuse mistakes with one line and exit 2."""

from __future__ import annotations

from typer.testing import CliRunner

from fedtext.cli import app

runner = CliRunner()


def test_unknown_privacy_unit_is_a_one_line_error() -> None:
    r = runner.invoke(app, ["audit", "canary", "--privacy-unit", "household"])
    assert r.exit_code == 2 and "should be example or user" in r.output
    assert "Traceback" not in r.output


def test_rows_per_user_needs_the_user_unit_and_at_least_one_row() -> None:
    r = runner.invoke(app, ["audit", "canary", "--rows-per-user", "3"])
    assert r.exit_code == 2 and "--privacy-unit user only" in r.output
    r = runner.invoke(app, ["audit", "canary", "--privacy-unit", "user", "--rows-per-user", "0"])
    assert r.exit_code == 2 and "at least 1" in r.output
