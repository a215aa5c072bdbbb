"""`fedtext simulate`: a whole federation on this machine (Flower's Simulation Engine)."""

from __future__ import annotations

import logging
import uuid
from typing import Annotated, Any

import typer
from rich.table import Table

from fedtext.cli.console import UserError, console, fail, open_platform
from fedtext.cli.run_options import run_options
from runs.spec import RunSpec, key

# RunSpec settings that `simulate` takes as options; the rest are its own (`--tenants N`
# names the simulated tenants, `--insecure` turns secure mode off, `--resume RUN_ID`).
SIMULATE_SETTINGS = tuple(
    name
    for name in RunSpec.model_fields
    if name not in ("run_id", "resume", "tenants", "secure_mode", "participants")
)


@run_options(SIMULATE_SETTINGS)
def simulate(
    tenants: Annotated[int, typer.Option(help="Number of simulated tenants (one node each).")] = 3,
    gpu_fraction: Annotated[float, typer.Option(help="GPU share per virtual client.")] = 0.0,
    prefix: Annotated[str, typer.Option(help="Tenant names are PREFIX-1..N.")] = "sim",
    resume: Annotated[
        str | None, typer.Option(help="Continue run RUN_ID from its last checkpoint.")
    ] = None,
    insecure: Annotated[bool, typer.Option(help="Turn secure_mode off (tests only).")] = False,
    settings: dict[str, Any] | None = None,
) -> None:
    """Run a simulated federation on the demo corpus; missing tenants are created."""
    from fedtext.progress import watch_run
    from runs.simulation import SimulationConfig, SimulationFailed
    from runs.simulation import resume as resume_run
    from runs.simulation import simulate as run_sim
    from tenancy.db import session_scope
    from tenancy.errors import NotFound
    from tenancy.tenants import check_name, create_tenant, get_tenant

    platform = open_platform()
    logging.basicConfig(level=logging.WARNING)
    run_id = resume or uuid.uuid4().hex
    try:
        if resume:
            result = watch_run(platform, run_id, lambda: resume_run(platform, run_id), console)
        else:
            if tenants < 2:
                raise UserError("--tenants should be at least 2.")
            names = [f"{prefix}-{i}" for i in range(1, tenants + 1)]
            for n in names:
                check_name(n)
            given = settings or {}
            for option in ("client_dp_noise", "client_dp_clip"):
                if option in given and given.get("client_dp") != "fixed":
                    raise UserError(f"--{key(option)} applies with --client-dp fixed.")
            config = SimulationConfig.parse(
                {
                    **given,
                    "tenants": names,
                    "gpu_fraction": gpu_fraction,
                    "secure_mode": not insecure,
                }
            )
            with session_scope(platform.engine) as session:
                for n in names:
                    try:
                        get_tenant(session=session, name=n)
                    except NotFound:
                        create_tenant(session=session, keyring=platform.keyring, name=n)
                        console.print(f"created tenant {n}")
            result = watch_run(platform, run_id, lambda: run_sim(platform, config, run_id), console)
    except (SimulationFailed, ValueError) as exc:
        raise fail(str(exc), code=1) from None
    table = Table(
        "tenant", "train", "test", "global acc", "global F1", "personal acc", "personal F1",
        "run epsilon", "noise", "version",
    )  # fmt: skip
    for name, t in result.summary["tenants"].items():
        table.add_row(
            name,
            str(t["train_examples"]),
            str(t["test_examples"]),
            _num(t["global_accuracy"]),
            _num(t["global_macro_f1"]),
            _num(t["personalized_accuracy"]),
            _num(t["personalized_macro_f1"]),
            f"{t['run_epsilon']:.3f}",
            f"{t['noise_multiplier']:.3f}",
            f"{t['model']} v{t['version']}",
        )
    console.print(f"Run {result.run_id} completed.")
    console.print(table)
    for kind in ("refused", "failed", "rejected"):
        for reason in result.summary.get(kind, []):
            console.print(f"[yellow]{kind}:[/yellow] {reason}")
    if "client_level_dp" in result.summary:
        c = result.summary["client_level_dp"]
        console.print(f"client-level DP: epsilon {c['epsilon']:.3f} at delta {c['delta']:g}")


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
