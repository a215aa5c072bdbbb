"""What every command shares: the consoles, the user's errors and the platform settings.

A command reports a mistake the user can fix by raising :class:`UserError`;
:class:`CliGroup` (the class of every command group) is the one place that turns it, and
the domain errors that mean the same (:class:`orchestration.flower.FlowerError`,
:class:`tenancy.certificates.CredentialsError`), into ``error: MESSAGE`` on standard error
and exit code 2. Any other outcome (a failed run, a broken chain) is an explicit
:func:`fail` with its own exit code.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from typer.core import TyperGroup

from orchestration.flower import FlowerError
from tenancy.certificates import CredentialsError

if TYPE_CHECKING:
    import click

    from fedtext.settings import Settings
    from tenancy.platform import Platform

console = Console(soft_wrap=True)  # never wrap a key or an error across lines
err = Console(stderr=True, soft_wrap=True)

USER_ERROR_EXIT = 2


class UserError(Exception):
    """A mistake the user can fix; reported as ``error: ...`` with exit code 2."""


def fail(message: str, code: int = USER_ERROR_EXIT) -> typer.Exit:
    """Print ``error: MESSAGE`` on standard error; the exit to raise, with ``code``."""
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def write_out(out: Path, text: str) -> bool:
    """``text`` to the file ``out``, or to standard output for ``-``; True when a file was
    written (the caller then says so)."""
    if str(out) == "-":
        console.out(text, end="", highlight=False)
        return False
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UserError(f"Cannot write {out}: {exc.strerror}.") from None
    return True


class CliGroup(TyperGroup):
    """A command group whose commands' user errors become a message and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (UserError, FlowerError, CredentialsError) as exc:
            raise fail(str(exc)) from None


def group(help: str) -> typer.Typer:
    """A command group of ``fedtext`` (help shown when it is called without a command)."""
    return typer.Typer(cls=CliGroup, no_args_is_help=True, help=help)


def settings() -> Settings:
    """The process's settings; a bad ``FEDTEXT_*`` value is the user's to fix."""
    from fedtext.settings import Settings  # the key providers' modules: not for --help

    try:
        return Settings()
    except ValidationError as exc:
        raise UserError(
            "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
        ) from None


def open_platform(config: Settings | None = None) -> Platform:
    """The platform of ``config`` (default: :func:`settings`), its schema brought up to date."""
    from fedtext.bootstrap import platform_from_settings, upgrade_schema

    built = platform_from_settings(config or settings())
    upgrade_schema(built)
    return built
