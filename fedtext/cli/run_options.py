"""Typer options made from RunSpec's settings: their flags, help and defaults, so a new run
setting reaches the CLI without an edit here."""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Iterable
from typing import Annotated, Any

import typer
from rich.markup import escape

from runs.spec import AUTO, RunSpec, defaults, key

_DEFAULTS = defaults()


def _option_type(annotation: Any) -> type:
    """The type a flag takes: names (tuples) and JSON (dicts) are given as text."""
    return annotation if annotation in (bool, int, float) else str


def env_var(name: str) -> str:
    """The environment variable a run option also reads: FEDTEXT_RUN_<NAME>."""
    return f"FEDTEXT_RUN_{name.upper()}"


def run_options(names: Iterable[str]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add one ``--kebab-name`` option per RunSpec setting in ``names`` to a command.

    The command receives them as ``settings``: only what the user gave (as an option or as
    ``FEDTEXT_RUN_<NAME>`` in the environment), so RunSpec (and the model family) decide
    every default in one place.
    """
    names = tuple(names)

    def wrap(command: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(command)
        hints = typing.get_type_hints(command, include_extras=True)  # "from __future__" strings
        own = [
            p.replace(annotation=hints.get(n, p.annotation))
            for n, p in signature.parameters.items()
            if n != "settings"
        ]
        added = []
        for name in names:
            field = RunSpec.model_fields[name]
            kind = _option_type(field.annotation)
            default = _DEFAULTS[key(name)]
            shown = "the model family's" if default == AUTO else default
            text = (field.description or "").removesuffix(".")
            if "[default:" not in text:
                text += f" [default: {shown}]"
            text = escape(text)  # rich would read "[default: ...]" as markup
            flag = f"--{key(name)}" if kind is not bool else f"--{key(name)}/--no-{key(name)}"
            added.append(
                inspect.Parameter(
                    name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=None,
                    annotation=Annotated[
                        kind | None,
                        typer.Option(
                            flag,
                            help=text,
                            show_default=False,
                            envvar=env_var(name),
                            show_envvar=False,  # one line in the command's help says so
                        ),
                    ],
                )
            )

        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            values = {n: kwargs.pop(n, None) for n in names}
            given = {n: v for n, v in values.items() if v is not None}
            return command(settings=given, **kwargs)

        parameters = [*own, *added]
        run.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in parameters}
        return run

    return wrap
