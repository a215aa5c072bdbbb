"""`fedtext keys` and `fedtext tenant delete`: real database, exit 2 with a message on mistakes."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedtext.cli import app

runner = CliRunner()


def test_rotate_and_delete_through_the_cli(data_dir: Path) -> None:
    assert runner.invoke(app, ["tenant", "create", "acme"]).exit_code == 0
    r = runner.invoke(app, ["keys", "rotate-kek", "--grace", "0"])
    assert r.exit_code == 0 and "KEK version 2 is current; 1 data key(s) rewrapped" in r.output
    r = runner.invoke(app, ["keys", "rotate-dek", "--tenant", "acme"])
    assert r.exit_code == 0 and "old data key is destroyed" in r.output
    r = runner.invoke(app, ["keys", "list", "--tenant", "acme"])
    assert r.exit_code == 0 and "admin" in r.output
    r = runner.invoke(app, ["tenant", "delete", "acme"])
    assert r.exit_code == 2 and "--yes" in r.output
    r = runner.invoke(app, ["tenant", "delete", "acme", "--yes"])
    assert r.exit_code == 0 and "1 data key(s) destroyed" in r.output
    assert "ledger is kept" in r.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["keys", "rotate-dek", "--tenant", "ghost"], "No tenant named 'ghost'"),
        (["tenant", "delete", "ghost", "--yes"], "No tenant named 'ghost'"),
        (["keys", "revoke", "nope"], "No key with prefix 'nope'"),
    ],
)
def test_user_mistakes_exit_2_without_a_traceback(
    data_dir: Path, args: list[str], message: str
) -> None:
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output


def test_rotate_kek_with_the_env_provider_is_refused(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDTEXT_KEY_PROVIDER", "env")
    monkeypatch.setenv("FEDTEXT_KEK", "A" * 43 + "=")
    r = runner.invoke(app, ["keys", "rotate-kek"])
    assert r.exit_code == 2 and "cannot rotate" in r.output
