"""`fedtext simulate`: a whole federation on this machine (Flower's Simulation Engine)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from fedtext.cli.console import UserError, console, fail, open_platform, settings
from fedtext.cli.run_options import DATA_PANEL, MACHINE_PANEL, run_options
from fedtext.format import num
from runs.spec import RunSpec, key

# RunSpec settings that `simulate` takes as options; the rest are its own (`--tenant NAME`
# or `--tenants N` name the simulated tenants, `--insecure` turns secure mode off,
# `--resume RUN_ID`).
SIMULATE_SETTINGS = tuple(
    name
    for name in RunSpec.model_fields
    if name not in ("run_id", "resume", "tenants", "secure_mode", "participants")
)


# --help: the command's own options in the run settings' panels; what applies to own data.
_PANELS = {
    **dict.fromkeys(("tenant", "data", "tenants", "prefix"), DATA_PANEL),
    **dict.fromkeys(("gpu_fraction", "resume", "insecure", "verbose"), MACHINE_PANEL),
}
_OWN_DATA_DEFAULTS = {
    "labels": "read from --data; negative, neutral, positive on the demo corpus",
    "max_train_examples": "with --data the whole file (0); 2000 on the demo corpus",
    "max_test_examples": "with --data the whole split (0); 500 on the demo corpus",
    "partitioning": "iid (how one --data FILE or the demo corpus is split)",
}


@run_options(SIMULATE_SETTINGS, _PANELS, _OWN_DATA_DEFAULTS)
def simulate(
    tenant: Annotated[
        list[str] | None,
        typer.Option(
            "--tenant",
            help=escape(
                "A tenant to train (repeat the option; existing tenants are used, missing "
                "ones created) [default: PREFIX-1..N]"
            ),
            show_default=False,
        ),
    ] = None,
    data: Annotated[
        list[str] | None,
        typer.Option(
            "--data",
            help=escape(
                "Training data, CSV or JSONL with text and label: one FILE split over the "
                "tenants by --partitioning, or TENANT=FILE once per tenant [default: the "
                "demo tweet corpus]"
            ),
            show_default=False,
        ),
    ] = None,
    tenants: Annotated[
        int, typer.Option(help="Number of simulated tenants when no --tenant is given.")
    ] = 3,
    prefix: Annotated[str, typer.Option(help="Names of those tenants: PREFIX-1..N.")] = "sim",
    gpu_fraction: Annotated[float, typer.Option(help="GPU share per virtual client.")] = 0.0,
    resume: Annotated[
        str | None,
        typer.Option(help="Continue run RUN_ID from its last checkpoint.", show_default=False),
    ] = None,
    insecure: Annotated[bool, typer.Option(help="Turn secure_mode off (tests only).")] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Show the libraries' logs here too.")
    ] = False,
    settings: dict[str, Any] | None = None,
) -> None:
    """Train a simulated federation: named tenants on their own files or the demo corpus.

    Prints each tenant's model version, a predict key and the lines to serve and query it.
    Every run option also reads FEDTEXT_RUN_<OPTION> from the environment.
    """
    # The user's mistakes first, before torch and Flower load (seconds).
    asked = {} if resume else _config(tenant or [], data or [], tenants, prefix, settings or {})
    from fedtext.handoff import SAMPLE_INPUT, handoffs, print_handoffs
    from fedtext.log_file import current, setup
    from fedtext.progress import watch_run
    from orchestration.preflight import check_budgets
    from orchestration.simulation import SimulationConfig, SimulationFailed, data_labels, preflight
    from orchestration.simulation import resume as resume_run
    from orchestration.simulation import simulate as run_sim
    from tenancy.errors import InvalidInput

    if verbose:
        setup(settings_dir(), verbose=True)
    platform = open_platform()
    run_id = resume or uuid.uuid4().hex
    try:
        if resume:
            result = watch_run(platform, run_id, lambda: resume_run(platform, run_id), console)
        else:
            config = SimulationConfig.parse(
                {
                    **asked,
                    "gpu_fraction": gpu_fraction,
                    "secure_mode": not insecure,
                }
            )
            if "labels" not in (settings or {}) and (config.data_file or config.data_files):
                config = SimulationConfig.parse({**config.public(), "labels": data_labels(config)})
            # Checked before a tenant is created, anything trains or anything is charged.
            counts = preflight(config, _ensure_tenants(platform, list(config.tenants), False))
            # The budget too, before Flower starts and before any progress bar.
            check_budgets(platform, config, counts)
            _ensure_tenants(platform, list(config.tenants), True)
            if config.data_file or config.data_files:
                sizes = ", ".join(f"{t} {n}" for t, n in counts.items())
                console.print(f"Training examples: {sizes}; labels: {', '.join(config.labels)}.")
            result = watch_run(platform, run_id, lambda: run_sim(platform, config, run_id), console)
    except (SimulationFailed, ValueError, InvalidInput) as exc:
        raise fail(str(exc), code=1 if isinstance(exc, SimulationFailed) else 2) from None
    order = list(result.summary["tenants"])
    if not resume:
        order = list(config.tenants)
    _print_result(result.run_id, result.summary, order)
    ended = {n: result.summary["tenants"][n] for n in order if n in result.summary["tenants"]}
    own_data = not resume and bool(config.data_file or config.data_files)
    print_handoffs(
        console,
        handoffs(platform, ended),
        log_file=current(),
        sample="your text here" if own_data else SAMPLE_INPUT,
    )


def settings_dir() -> Path:
    return settings().data_dir


def _config(
    names: list[str], data: list[str], count: int, prefix: str, given: dict[str, Any]
) -> dict[str, Any]:
    """The run's settings from the command's options (checked, with what to change)."""
    for option in ("client_dp_noise", "client_dp_clip"):
        if option in given and given.get("client_dp") != "fixed":
            raise UserError(f"--{key(option)} applies with --client-dp fixed.")
    per_tenant = [d for d in data if "=" in d]
    if per_tenant and len(per_tenant) != len(data):
        raise UserError("Give --data FILE once, or --data TENANT=FILE for every tenant.")
    if len(data) > 1 and not per_tenant:
        raise UserError("One --data FILE is split over the tenants; name more as TENANT=FILE.")
    files: dict[str, str] = {}
    for entry in per_tenant:
        name, _, path = entry.partition("=")
        if name.strip() in files:
            raise UserError(f"--data names {name.strip()} twice.")
        files[name.strip()] = path.strip()
    if files and not names:
        names = list(files)
    if not names:
        if count < 2:
            raise UserError("--tenants should be at least 2.")
        names = [f"{prefix}-{i}" for i in range(1, count + 1)]
    if len(names) < 2:
        raise UserError("A federation needs at least two tenants: give --tenant twice or more.")
    if files and set(files) != set(names):
        raise UserError(
            f"--data names {', '.join(files)} but the tenants are {', '.join(names)}: "
            "give each tenant one file."
        )
    out: dict[str, Any] = {**given, "tenants": names}
    for path in [*files.values(), *([data[0]] if data and not files else [])]:
        if not Path(path).is_file():
            raise UserError(f"Data file not found: {path}")
    if files:
        out["data_files"] = {n: str(Path(p).resolve()) for n, p in files.items()}
    elif data:
        out["data_file"] = str(Path(data[0]).resolve())
    if data:
        # A tenant's own file is used whole unless the user caps it.
        out.setdefault("max_train_examples", 0)
        out.setdefault("max_test_examples", 0)
    return out


def _ensure_tenants(platform: Any, names: list[str], create: bool) -> dict[str, float]:
    """Each existing tenant's budget delta (for the checks); ``create``: the missing ones
    are created."""
    from tenancy.db import session_scope
    from tenancy.errors import NotFound
    from tenancy.tenants import check_name, create_tenant, get_tenant

    for n in names:
        check_name(n)
    deltas = {}
    with session_scope(platform.engine) as session:
        for n in names:
            try:
                row = get_tenant(session=session, name=n)
            except NotFound:
                if not create:
                    continue
                row = create_tenant(session=session, keyring=platform.keyring, name=n)
                console.print(f"Created tenant {n} (budget epsilon {num(row.budget_epsilon)}).")
            deltas[n] = row.budget_delta
    return deltas


def _print_result(run_id: str, summary: dict[str, Any], order: list[str]) -> None:
    from fedtext.progress import epsilon_notes, result_notes, result_row, results_table

    tenants = summary["tenants"]
    models = sorted({str(t["model"]) for t in tenants.values()})
    table = results_table(models, "spent by this run")
    ordered = sorted(tenants, key=lambda n: order.index(n) if n in order else len(order))
    for name in ordered:
        table.add_row(*result_row(name, tenants[name], num(tenants[name]["run_epsilon"])))
    console.print(f"Run {run_id} completed.")
    console.print(table)
    for line in result_notes({n: tenants[n] for n in ordered}, summary.get("eval_noise")):
        console.print(line)
    for line in epsilon_notes(summary.get("target_epsilon"), tenants, summary.get("eval_noise")):
        console.print(line)
    for kind in ("refused", "failed", "rejected"):
        for reason in summary.get(kind, []):
            console.print(f"[yellow]{kind}:[/yellow] {reason}")
    if "client_level_dp" in summary:
        c = summary["client_level_dp"]
        console.print(f"client-level DP: epsilon {num(c['epsilon'])} at delta {c['delta']:g}")
