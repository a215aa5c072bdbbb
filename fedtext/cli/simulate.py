"""`fedtext simulate`: a whole federation on this machine (Flower's Simulation Engine)."""

from __future__ import annotations

import logging
import uuid
from typing import Annotated, Any

import typer
from rich.table import Table

from fedtext.cli.console import UserError, console, fail, open_platform


def simulate(
    tenants: Annotated[int, typer.Option(help="Number of simulated tenants (one node each).")] = 3,
    rounds: Annotated[
        int | None, typer.Option(help="Federated rounds [default: the family's]")
    ] = None,
    epsilon: Annotated[float, typer.Option(help="Target epsilon per tenant for the run.")] = 3.0,
    model: Annotated[
        str,
        typer.Option(
            help="encoder-head (frozen public encoder + DP head), lstm, transformer or minilm."
        ),
    ] = "encoder-head",
    strategy: Annotated[str, typer.Option(help="fedavg, fedprox or fedadam.")] = "fedavg",
    partitioning: Annotated[str, typer.Option(help="iid, dirichlet or topic.")] = "iid",
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration (label skew).")] = 0.5,
    local_epochs: Annotated[
        int | None, typer.Option(help="Local epochs per round [default: the family's]")
    ] = None,
    personalize_epochs: Annotated[
        int | None, typer.Option(help="DP fine-tune epochs; 0: off [default: the family's]")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            help="Expected (Poisson) batch; 0: a tenth of each tenant's data "
            "[default: the family's]"
        ),
    ] = None,
    learning_rate: Annotated[
        float | None, typer.Option(help="Client Adam learning rate [default: the family's]")
    ] = None,
    clip_norm: Annotated[float, typer.Option(help="Per-example clipping norm.")] = 1.0,
    fraction_train: Annotated[float, typer.Option(help="Share of tenants per round.")] = 1.0,
    min_nodes: Annotated[int, typer.Option(help="Valid replies a round needs.")] = 2,
    client_dp_noise: Annotated[
        float, typer.Option(help="Client-level DP noise (Flower wrapper); 0: off.")
    ] = 0.0,
    client_dp_clip: Annotated[float, typer.Option(help="Client-level update clip.")] = 10.0,
    max_train_examples: Annotated[int, typer.Option(help="Cap per tenant (0: no cap).")] = 3000,
    max_test_examples: Annotated[int, typer.Option(help="Cap per tenant (0: no cap).")] = 600,
    gpu_fraction: Annotated[float, typer.Option(help="GPU share per virtual client.")] = 0.0,
    prefix: Annotated[str, typer.Option(help="Tenant names are PREFIX-1..N.")] = "sim",
    resume: Annotated[
        str | None, typer.Option(help="Continue run RUN_ID from its last checkpoint.")
    ] = None,
    insecure: Annotated[bool, typer.Option(help="Turn secure_mode off (tests only).")] = False,
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
            config = SimulationConfig(
                tenants=names,
                rounds=rounds,
                epsilon=epsilon,
                model=model,
                strategy=strategy,
                partitioning=partitioning,
                alpha=alpha,
                local_epochs=local_epochs,
                personalize_epochs=personalize_epochs,
                batch_size=batch_size,
                learning_rate=learning_rate,
                clip_norm=clip_norm,
                fraction_train=fraction_train,
                min_nodes=min_nodes,
                client_dp_noise=client_dp_noise,
                client_dp_clip=client_dp_clip,
                max_train_examples=max_train_examples,
                max_test_examples=max_test_examples,
                gpu_fraction=gpu_fraction,
                secure_mode=not insecure,
            )
            _validate_simulation(config)
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
    for key in ("refused", "failed", "rejected"):
        for reason in result.summary.get(key, []):
            console.print(f"[yellow]{key}:[/yellow] {reason}")
    if "client_level_dp" in result.summary:
        c = result.summary["client_level_dp"]
        console.print(f"client-level DP: epsilon {c['epsilon']:.3f} at delta {c['delta']:g}")


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _validate_simulation(config: Any) -> None:
    """Refuse bad options before anything starts, with the option's own words."""
    from clients.data import PARTITIONERS
    from models import families
    from server.strategy import strategy_names

    config.validate()
    if config.model not in families():
        raise ValueError(f"Unknown model family {config.model!r}; known: {', '.join(families())}.")
    if config.strategy not in strategy_names():
        raise ValueError(
            f"Unknown strategy {config.strategy!r}; known: {', '.join(strategy_names())}."
        )
    if config.partitioning not in PARTITIONERS:
        raise ValueError(
            f"Unknown partitioning {config.partitioning!r}; known: {', '.join(PARTITIONERS)}."
        )
    if config.rounds < 1 or config.epsilon <= 0:
        raise ValueError("--rounds should be positive and --epsilon a positive value.")
