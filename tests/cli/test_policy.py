"""`fedtext policy`: the operator sets a tenant's governance; what planning then applies."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from fedtext.cli import app

runner = CliRunner()


def test_the_operator_sets_and_shows_a_tenants_policy_with_clear_errors(data_dir: Path) -> None:
    assert runner.invoke(app, ["tenant", "create", "globex"]).exit_code == 0
    shown = runner.invoke(app, ["policy", "show", "globex"])
    assert shown.exit_code == 0, shown.output
    assert "deploy if-better; secure mode not required" in shown.output
    ok = runner.invoke(
        app,
        ["policy", "set", "globex", "--deploy", "never", "--require-secure-mode",
         "--max-epsilon", "2", "--families", "lstm,encoder-head", "--dataset", "crm"],
    )  # fmt: skip
    assert ok.exit_code == 0, ok.output
    assert ok.output.strip() == (
        "globex: deploy never; secure mode required; largest epsilon per run 2; families "
        "encoder-head, lstm; dataset crm"
    )
    lifted = runner.invoke(app, ["policy", "set", "globex", "--any-epsilon", "--families", ""])
    assert "largest epsilon per run any; families any; dataset crm" in lifted.output
    for args, words in (
        (["--deploy", "sometimes"], "Unknown deploy policy 'sometimes'"),
        (["--families", "cnn"], "Unknown model family cnn"),
        (["--dataset", "../etc"], "Invalid dataset name"),
    ):
        bad = runner.invoke(app, ["policy", "set", "globex", *args])
        assert bad.exit_code == 2 and words in bad.output, bad.output
        assert "Traceback" not in bad.output
    missing = runner.invoke(app, ["policy", "show", "nobody"])
    assert missing.exit_code == 2 and "No tenant named 'nobody'" in missing.output
