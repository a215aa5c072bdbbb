"""Typer options made from RunSpec's settings: their flags, help and defaults, so a new run
setting reaches the CLI without an edit here."""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any

import typer
from rich.markup import escape

from runs.spec import AUTO, RunSpec, defaults, key

_DEFAULTS = defaults()

# --help groups run settings into panels (rich); a setting not named here goes to the last.
DATA_PANEL = "Tenants and data"
PANELS = {
    **dict.fromkeys(
        ("tenants", "participants", "labels", "partitioning", "alpha", "max_train_examples",
         "max_test_examples"),
        DATA_PANEL,
    ),
    **dict.fromkeys(
        ("model", "rounds", "local_epochs", "batch_size", "learning_rate", "personalize_epochs",
         "max_seq_len", "family_config", "init_head_run", "keep_head"),
        "Model and training",
    ),
    **dict.fromkeys(
        ("epsilon", "clip_norm", "eval_noise", "client_dp", "client_dp_noise", "client_dp_clip",
         "dataset", "secure_mode", "privacy_unit", "user_column", "max_examples_per_user"),
        "Privacy",
    ),
    **dict.fromkeys(
        ("strategy", "proximal_mu", "server_learning_rate", "fraction_train", "min_nodes",
         "round_timeout", "seed"),
        "Federation",
    ),
    **dict.fromkeys(("deploy", "model_name"), "Release"),
}  # fmt: skip
OTHER_PANEL = "Other"
MACHINE_PANEL = "Machine"
_PANEL_ORDER = (DATA_PANEL, "Model and training", "Privacy", "Release", "Federation", OTHER_PANEL,
                MACHINE_PANEL)  # fmt: skip


def _option_type(annotation: Any) -> type:
    """The type a flag takes: names (tuples) and JSON (dicts) are given as text."""
    return annotation if annotation in (bool, int, float) else str


def env_var(name: str) -> str:
    """The environment variable a run option also reads: FEDTEXT_RUN_<NAME>."""
    return f"FEDTEXT_RUN_{name.upper()}"


def run_options(
    names: Iterable[str],
    panels: Mapping[str, str] | None = None,
    shown_defaults: Mapping[str, str] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add one ``--kebab-name`` option per RunSpec setting in ``names`` to a command.

    The command receives them as ``settings``: only what the user gave (as an option or as
    ``FEDTEXT_RUN_<NAME>`` in the environment), so RunSpec (and the model family) decide
    every default in one place. ``--help`` groups them in :data:`PANELS`; ``panels`` puts
    the command's own options (by parameter name) in panels too, and ``shown_defaults``
    says what applies where RunSpec's default is not what the command uses.
    """
    names = tuple(names)
    panels = {**PANELS, **(panels or {})}
    shown_defaults = dict(shown_defaults or {})

    def wrap(command: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(command)
        hints = typing.get_type_hints(command, include_extras=True)  # "from __future__" strings
        own = [
            p.replace(annotation=hints.get(n, p.annotation))
            for n, p in signature.parameters.items()
            if n != "settings"
        ]
        for p in own:  # the command's own options join the panels it names
            for info in getattr(p.annotation, "__metadata__", ()):
                if isinstance(info, typer.models.OptionInfo) and p.name in panels:
                    info.rich_help_panel = panels[p.name]
        added = []
        for name in names:
            field = RunSpec.model_fields[name]
            kind = _option_type(field.annotation)
            default = _DEFAULTS[key(name)]
            shown = "the model family's" if default == AUTO else default
            shown = shown_defaults.get(name, shown)
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
                            rich_help_panel=panels.get(name, OTHER_PANEL),
                        ),
                    ],
                )
            )

        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            values = {n: kwargs.pop(n, None) for n in names}
            given = {n: v for n, v in values.items() if v is not None}
            return command(settings=given, **kwargs)

        # Panels show in the order their first option comes: keyword-only, so any order.
        kw = inspect.Parameter.KEYWORD_ONLY
        parameters = sorted(
            [p.replace(kind=kw) for p in own] + added,
            key=lambda p: _PANEL_ORDER.index(panels.get(p.name, OTHER_PANEL)),
        )
        run.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in parameters}
        return run

    return wrap
