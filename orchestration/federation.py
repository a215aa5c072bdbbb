"""Runs started over HTTP on a real federation (a SuperLink), and their worker.

With ``FEDTEXT_SUPERLINK`` set, ``fedtext serve`` gives the API a
:class:`FederationRunLauncher`. Its worker, ``python -m orchestration.federation RUN_ID``,
is a session leader like the simulation worker (it survives an API restart; cancel stops
its process group), records its PID and beats on the run. It submits the run with
``flwr run`` (run-config ``run-id`` = the platform run id, so the ServerApp records status
and per-round metrics on that row of the shared database), stores Flower's run id on the
row, polls Flower until the run finishes and marks the row failed, with Flower's reason,
when the ServerApp could not record an end itself.

The request is kept in ``simulation_json`` like a simulated run's, with ``superlink`` (the
mark of a federation run), ``run_config`` (what ``flwr run`` gets) and ``flower_run_id``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session

from orchestration.flower import (
    FlowerError,
    app_config_keys,
    build_run_config,
    check_certificate,
    check_reachable,
    existing_file,
    find_app_dir,
    flower_run_status,
    parse_address,
    stop_run,
    submit_run,
    write_connection,
)
from orchestration.worker import WorkerLauncher, engine_url, start_heartbeat
from runs.lifecycle import claim_run, end_run, get_run, record_request, run_status
from runs.spec import SIMULATION_ONLY, RunSpec
from runs.status import FINISHED, RunStatus
from tenancy.platform import Platform
from tenancy.tables import TrainingRun

CONNECTION = "fedtext-api"
POLL_SECONDS = 2.0
FLOWER_POLL_SECONDS = 30.0
# How long the worker keeps trying when Flower cannot tell a run's status (SuperLink down).
STATUS_PATIENCE_SECONDS = 600.0


def federation_run_config(
    config: dict[str, Any], run_id: str, known: dict[str, Any]
) -> dict[str, Any]:
    """The ``flwr run --run-config`` overrides of an API request (``RunCreate`` fields plus
    ``tenants``, the caller first); ValueError, with a message for the user, if it cannot run.

    ``known`` is the app's ``[tool.flwr.app.config]``: flwr accepts no other key.
    """
    tenants = config.get("tenants", [])
    if len(tenants) < 2:
        raise ValueError("A federation needs at least two tenants.")
    given = [k for k in SIMULATION_ONLY if k != "tenants" and k in config]
    if given:
        raise ValueError(
            f"{', '.join(given)}: only for simulated runs; this server runs training on its "
            "federation, where each tenant's node trains on its own data file."
        )
    # The nodes that connect decide who could train, so the named tenants become the
    # ServerApp's participants.
    settings = {k: v for k, v in config.items() if k != "tenants"}
    spec = RunSpec.parse({**settings, "participants": tenants, "run_id": run_id})
    overrides = spec.server_part()
    try:
        overrides = build_run_config(known, overrides, [])
    except FlowerError as exc:
        raise ValueError(str(exc)) from None
    return overrides


def flower_run_id(run: TrainingRun) -> int | None:
    value = json.loads(run.simulation_json or "{}").get("flower_run_id")
    return int(value) if value is not None else None


def _record(engine: Engine, run_id: str, **fields: Any) -> None:
    """Add ``fields`` to the run's stored request."""
    if get_run(engine, run_id) is None:
        raise LookupError(f"No run {run_id}.")
    record_request(engine, run_id, fields, merge=True)


class FederationRunLauncher(WorkerLauncher):
    """Submits runs to a SuperLink (TLS) through a detached worker per run."""

    module = "orchestration.federation"

    def __init__(self, platform: Platform, log_dir: Path, superlink: str, ca: Path | None) -> None:
        """Raises FlowerError when the address or the CA certificate is not usable."""
        parse_address(superlink)
        ca_path = existing_file(ca, "CA certificate", " (FEDTEXT_SUPERLINK_CA)")
        check_certificate(ca_path, "CA certificate")
        self.platform = platform
        self.superlink = superlink
        self.app_dir = find_app_dir(None)
        self.known = app_config_keys(self.app_dir)
        # A private FLWR_HOME: the operator's own flwr connections are left alone, and the
        # file is written once here, never concurrently by workers.
        self.flwr_home = log_dir / "flwr"
        write_connection(CONNECTION, superlink, ca_path, home=self.flwr_home)
        super().__init__(
            {
                "FEDTEXT_WORKER_DATABASE_URL": engine_url(platform.engine),
                "FEDTEXT_WORKER_APP": str(self.app_dir),
                "FLWR_HOME": str(self.flwr_home.resolve()),
            },
            log_dir,
        )

    def check(self, config: dict[str, Any]) -> None:
        federation_run_config(config, "check", self.known)

    def launch(self, run_id: str) -> int:
        try:
            check_reachable(self.superlink)
        except FlowerError as exc:
            raise ConnectionError(str(exc)) from None
        with Session(self.platform.engine) as session:
            run = session.get(TrainingRun, run_id)
            request = json.loads(run.simulation_json or "{}") if run is not None else {}
        # Computed here (the API has it all imported), so the worker starts light.
        run_config = federation_run_config(request, run_id, self.known)
        _record(self.platform.engine, run_id, superlink=self.superlink, run_config=run_config)
        return super().launch(run_id)

    def cancel(self, run_id: str, pid: int | None) -> None:
        """``flwr stop`` the run and stop its worker; ConnectionError if Flower refuses."""
        flower_id = self._flower_id(run_id)
        if flower_id is None:
            # Not submitted yet, or being submitted: mark it first (a ServerApp that starts
            # now stands down), then stop the worker and the `flwr run` it may be in.
            end_run(self.platform.engine, run_id, RunStatus.CANCELLED, "Cancelled before it ran.")
            self.stop_worker(run_id, pid)
            flower_id = self._flower_id(run_id)
        if flower_id is not None:
            try:
                stop_run(CONNECTION, flower_id, home=self.flwr_home)
            except FlowerError as exc:
                raise ConnectionError(str(exc)) from None
        self.stop_worker(run_id, pid)

    def _flower_id(self, run_id: str) -> int | None:
        with Session(self.platform.engine) as session:
            run = session.get(TrainingRun, run_id)
            return flower_run_id(run) if run is not None else None


def interrupted_reason(engine: Engine, run_id: str, flower_reason: str) -> str:
    """What an interrupted federation run says: why, and the command that resumes it."""
    run = get_run(engine, run_id)
    request = json.loads(run.simulation_json or "{}") if run is not None else {}
    done = run.checkpoint_round if run is not None else 0
    return (
        f"Interrupted: {flower_reason}, and its ServerApp recorded no end (it was stopped: "
        f"the SuperLink restarted or its host was lost). Rounds done: {done}. Resume it "
        f"with: fedtext federation run --superlink {request.get('superlink', 'HOST:PORT')} "
        f"--ca CA_FILE --run-id {run_id} --config resume=true"
    )


def follow(
    engine: Engine,
    run_id: str,
    flower_id: int,
    poll: float = POLL_SECONDS,
    flower_every: float = FLOWER_POLL_SECONDS,
) -> RunStatus | None:
    """Wait until the run ends; returns its final status.

    The ServerApp records the end on the row (read every ``poll`` seconds). Flower's own
    status, asked every ``flower_every`` seconds (each ``flwr ls`` is a process: not more
    often), covers a ServerApp that never started or died: the row is then failed with
    Flower's reason.
    """
    last_seen = time.monotonic()
    next_flower = last_seen + flower_every
    while (status := run_status(engine, run_id)) is not None and status.active:
        now = time.monotonic()
        if now >= next_flower:
            next_flower = now + flower_every
            try:
                flower_status, details = flower_run_status(CONNECTION, flower_id)
                last_seen = now
            except FlowerError as exc:
                if now - last_seen > STATUS_PATIENCE_SECONDS:
                    end_run(engine, run_id, RunStatus.FAILED, f"Lost track of the run: {exc}")
                    continue
                print(f"Flower run {flower_id}: status unreadable, retrying: {exc}", flush=True)
            else:
                if flower_status.startswith("finished"):
                    reason = f"Flower run {flower_id} ended {flower_status}"
                    if details and details != "N/A":
                        reason += f": {details}"
                    # Conditional: a ServerApp that recorded its end meanwhile keeps it.
                    # One that started (running) and vanished without an end was killed
                    # (its SuperLink died, its host was lost): resumable from its checkpoint.
                    ended_running = end_run(
                        engine,
                        run_id,
                        RunStatus.INTERRUPTED,
                        interrupted_reason(engine, run_id, reason),
                        unless=(*FINISHED, RunStatus.CREATED),
                    )
                    if not ended_running:  # never started: Flower's reason is the failure
                        end_run(engine, run_id, RunStatus.FAILED, reason)
                    continue
        time.sleep(poll)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_id")
    args = parser.parse_args(argv)
    from tenancy.db import get_engine

    engine = get_engine(os.environ["FEDTEXT_WORKER_DATABASE_URL"])
    run = claim_run(engine, args.run_id)
    request = json.loads(run.simulation_json or "{}") if run is not None else {}
    if "run_config" not in request:
        print(f"No federation run {args.run_id}.", file=sys.stderr)
        return 2
    stop = start_heartbeat(engine, args.run_id)
    try:
        app_dir = Path(os.environ["FEDTEXT_WORKER_APP"])
        flower_id = submit_run(app_dir, CONNECTION, request["run_config"])
        _record(engine, args.run_id, flower_run_id=flower_id)
        print(f"Run {args.run_id}: Flower run {flower_id} on {request['superlink']}", flush=True)
        status = follow(engine, args.run_id, flower_id)
    except FlowerError as exc:
        print(f"Run {args.run_id} failed: {exc}", file=sys.stderr)
        end_run(engine, args.run_id, RunStatus.FAILED, str(exc))
        return 1
    finally:
        stop.set()
    print(f"Run {args.run_id}: {status}.", flush=True)
    return 0 if status == RunStatus.COMPLETED else 1


if __name__ == "__main__":
    sys.exit(main())
