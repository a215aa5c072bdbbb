"""Every command's --help: no RST-style double backticks, and defaults shown."""

from __future__ import annotations

import re

import click
import typer
from typer.testing import CliRunner

from fedtext.cli import app

runner = CliRunner()


def _commands(group: click.Command, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(group, click.Group):
        return [p for name, cmd in group.commands.items() for p in _commands(cmd, (*path, name))]
    return [path]


def test_every_help_reads_without_rst_markup() -> None:
    commands = _commands(typer.main.get_command(app))
    assert ("simulate",) in commands and ("federation", "run") in commands
    for path in commands:
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (path, result.output)
        assert "``" not in result.output, path


def test_run_options_show_their_defaults() -> None:
    for path in (["simulate"], ["federation", "run"]):
        out = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"}).output
        for flag in ("--epsilon", "--rounds", "--batch-size", "--deploy", "--labels"):
            block = out.split(f"{flag} ", 1)[1].split("│ --", 1)[0]  # the option's rows
            assert "[default:" in block, (path, flag, block)
    serve = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    assert "else 8000" in serve and "else 127.0.0.1" in serve


def test_simulate_help_is_grouped_and_says_what_applies_to_own_data() -> None:
    out = runner.invoke(app, ["simulate", "--help"], env={"COLUMNS": "200"}).output
    panels = re.findall(r"╭─ ([A-Za-z ]+?) ─", out)
    assert panels == [
        "Options", "Tenants and data", "Model and training", "Privacy", "Release", "Federation",
        "Machine",
    ]  # fmt: skip
    data = out.split("Tenants and data", 1)[1].split("╰", 1)[0]
    for flag in ("--tenant ", "--data ", "--labels ", "--max-train-examples "):
        assert flag in data, flag
    assert "read from --data" in data and "with --data the whole file (0)" in data
    assert "--gpu-fraction" in out.split("╭─ Machine", 1)[1]
