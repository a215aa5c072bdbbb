"""`fedtext federation run` and `fedtext federation status`: submit a run to a SuperLink
(``flwr run``) and read its status as Flower and as the platform record it."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from fedtext.cli.console import (
    console,
    fail,
    settings,
)
from fedtext.cli.run_options import run_options
from fedtext.cli.superlink import (
    DEFAULT_CONNECTION,
    CaOpt,
    ConnectionOpt,
    SuperlinkOpt,
    connect,
)
from fedtext.format import num
from orchestration.flower import (
    app_config_keys,
    build_run_config,
    find_app_dir,
    flower_run_status,
    submit_run,
    validate_server_config,
)
from runs.spec import SIMULATION_ONLY, RunSpec, key
from runs.status import RunStatus


@dataclass
class FederationRunStatus:
    """A run as Flower and the platform (when this machine sees its database) record it."""

    flower_run_id: int
    flower_status: str
    flower_details: str
    platform_run_id: str
    platform_status: str | None
    platform_error: str | None
    summary: dict[str, Any]
    platform_note: str = "(no platform database here)"

    @property
    def completed(self) -> bool:
        flower_ok = self.flower_status == "finished:completed"
        return flower_ok and self.platform_status in (None, RunStatus.COMPLETED)


def platform_record(run_id: str) -> tuple[str | None, str | None, dict[str, Any]] | None:
    """(status, error, summary) of the platform's TrainingRun, or None when this machine
    cannot see the platform database (an operator laptop, say)."""
    from sqlmodel import Session

    from tenancy.db import get_engine
    from tenancy.tables import TrainingRun

    url = settings().resolved_database_url
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        return None
    try:
        with Session(get_engine(url)) as session:
            row = session.get(TrainingRun, run_id)
    except Exception:  # no such table, unreachable server: not this machine's database
        return None
    if row is None:
        return (None, f"not recorded in {_redacted(url)}", {})
    return row.status, row.error, json.loads(row.summary_json or "{}")


def _redacted(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def read_status(connection: str, flower_run_id: int, run_id: str) -> FederationRunStatus:
    status, details = flower_run_status(connection, flower_run_id)
    record = platform_record(run_id)
    if record is None:
        return FederationRunStatus(flower_run_id, status, details, run_id, None, None, {})
    p_status, p_error, summary = record
    if p_status is None:  # this database does not know the run: say so, do not fail on it
        return FederationRunStatus(
            flower_run_id, status, details, run_id, None, None, {}, p_error or ""
        )
    return FederationRunStatus(
        flower_run_id, status, details, run_id, p_status, p_error, summary, ""
    )


def _print_status(st: FederationRunStatus) -> None:
    from fedtext.progress import interval

    table = Table("", "value")
    table.add_row("Flower run", str(st.flower_run_id))
    table.add_row(
        "Flower status",
        st.flower_status
        + (f" ({st.flower_details})" if st.flower_details not in ("", "N/A") else ""),
    )
    table.add_row("platform run", st.platform_run_id)
    table.add_row("platform status", st.platform_status or st.platform_note)
    if st.platform_error:
        table.add_row("error", st.platform_error)
    for name, t in sorted(st.summary.get("tenants", {}).items()):
        table.add_row(
            f"tenant {name}",
            f"{t.get('model')} v{t.get('version')}, accuracy "
            f"{interval(t.get('accuracy'), t.get('accuracy_low'), t.get('accuracy_high'))}, "
            f"macro-F1 "
            f"{interval(t.get('macro_f1'), t.get('macro_f1_low'), t.get('macro_f1_high'))} "
            f"(DP-noised, 95% intervals), epsilon {num(t.get('run_epsilon'))}"
            + ("" if t.get("deployed", True) else ", waits for an admin's deploy"),
        )
    console.print(table)


# RunSpec settings that `federation run` takes as options (any other: --config KEY=VALUE);
# the simulation-only ones do not apply to a federation's nodes.
RUN_SETTINGS = tuple(
    n for n in RunSpec.model_fields if n not in (*SIMULATION_ONLY, "run_id", "participants")
)


@run_options(RUN_SETTINGS)
def run(
    superlink: SuperlinkOpt,
    ca: CaOpt = None,
    app: Annotated[
        Path | None, typer.Option(help="The Flower app directory (fedtext's pyproject.toml).")
    ] = None,
    config: Annotated[
        list[str] | None,
        typer.Option("--config", "-c", help="Any other run configuration KEY=VALUE (repeat)."),
    ] = None,
    run_id: Annotated[
        str | None, typer.Option(help="Platform run id. Default: flwr-<Flower run id>.")
    ] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the run to finish.")] = True,
    timeout: Annotated[float, typer.Option(help="Longest wait, in seconds.")] = 24 * 3600.0,
    poll: Annotated[float, typer.Option(help="Seconds between status reads.")] = 5.0,
    connection: ConnectionOpt = DEFAULT_CONNECTION,
    settings: dict[str, Any] | None = None,
) -> None:
    """Submit a run to the federation (flwr run) and wait for its status, read back.

    Exit 0 only when Flower reports finished:completed and the platform's run is completed.
    Every run option also reads FEDTEXT_RUN_<OPTION> from the environment.
    """
    app_dir = find_app_dir(app)
    given = {key(name): value for name, value in (settings or {}).items()}
    overrides = build_run_config(
        app_config_keys(app_dir), {**given, "run-id": run_id}, config or []
    )
    validate_server_config(overrides)
    conn = connect(superlink, ca, connection)
    flower_run_id = submit_run(app_dir, conn, overrides)
    platform_id = str(overrides.get("run-id") or _platform_run_id(flower_run_id))
    console.print(f"Submitted: Flower run {flower_run_id}, platform run {platform_id}")
    console.print(f"Follow its log with: flwr log {flower_run_id} {conn}")
    if not wait:
        return
    deadline = time.monotonic() + timeout
    while True:
        status, _ = flower_run_status(conn, flower_run_id)
        if status.startswith("finished"):
            break
        if time.monotonic() > deadline:
            raise fail(
                f"Run {flower_run_id} is still {status} after {timeout:.0f} s; "
                f"stop it with: flwr stop {flower_run_id} {conn}",
                1,
            )
        time.sleep(poll)
    st = read_status(conn, flower_run_id, platform_id)
    _print_status(st)
    if not st.completed:
        raise fail(_failure_reason(st), 1)


def _failure_reason(st: FederationRunStatus) -> str:
    reason = f"run {st.flower_run_id} ended {st.flower_status}"
    if st.platform_error:
        reason += f": {st.platform_error}"
    elif st.platform_status not in (None, RunStatus.COMPLETED):
        reason += f"; the platform recorded {st.platform_status}"
    return reason + f" (details: flwr log {st.flower_run_id})"


def _platform_run_id(flower_run_id: int) -> str:
    from fedtext.flower_apps import platform_run_id

    return platform_run_id(flower_run_id)


def status(
    flower_run_id: Annotated[int, typer.Argument(help="The Flower run id that `run` printed.")],
    superlink: SuperlinkOpt,
    ca: CaOpt = None,
    run_id: Annotated[
        str | None, typer.Option(help="Platform run id, when one was given to `run`.")
    ] = None,
    connection: ConnectionOpt = DEFAULT_CONNECTION,
) -> None:
    """A run's status as Flower and the platform record it.

    Exit 0: completed; 1: failed or stopped; 3: not finished yet.
    """
    conn = connect(superlink, ca, connection)
    st = read_status(conn, flower_run_id, run_id or _platform_run_id(flower_run_id))
    _print_status(st)
    if not st.flower_status.startswith("finished"):
        raise typer.Exit(3)  # not finished yet: neither success nor failure
    if not st.completed:
        raise fail(_failure_reason(st), 1)
