"""Background worker of a training run started over HTTP, and the launcher that starts it.

``python -m orchestration.worker RUN_ID`` runs the simulated federation recorded on the
run (``simulation_json``). The worker is its own session leader, so it survives an API
restart, and cancel stops it with everything it started (Ray) by process group. It
records its PID and host and beats every few seconds; an API that starts while the
worker is gone marks the run interrupted, resumable with ``fedtext simulate --resume``.

What the run derives from tenants' text on disk (the virtual nodes' sentence vectors) lives
in the run's own scratch directory, ``DATA_DIR/scratch/RUN_ID`` (0700): the worker removes
it however the run ends, the launcher removes it when it stops a worker (a killed worker
runs no ``finally``), and every launcher start and launch sweeps away the directories of
runs that are no longer active (a worker killed while no API ran).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, col, select

from orchestration.outages import MAX_OUTAGE_RETRIES, OUTAGE_BACKOFF_S, Outages, retry_blocker
from runs.lifecycle import HEARTBEAT_SECONDS, beat, claim_run, end_run, pid_alive, reopen_for_retry
from runs.status import ACTIVE, RunStatus
from tenancy.blobs import DatabaseBlobStore, LocalBlobStore, create_blob_store
from tenancy.hsm import Pkcs11Config, Pkcs11KeyProvider
from tenancy.key_providers import EnvKeyProvider, FileKeyProvider
from tenancy.platform import Platform
from tenancy.tables import TrainingRun

CANCEL_GRACE_SECONDS = 5.0


def scratch_dir(root: Path, run_id: str) -> Path:
    """The run's own scratch directory under ``root`` (not created)."""
    if not run_id or "/" in run_id or run_id in (".", ".."):
        raise ValueError(f"Invalid run id {run_id!r}.")
    return root / run_id


def remove_scratch(root: Path, run_id: str) -> bool:
    """Remove the run's scratch directory; True if there was one."""
    path = scratch_dir(root, run_id)
    if not path.exists():
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def sweep_scratch(engine: Engine, root: Path) -> list[str]:
    """Remove the scratch directories of runs that are not active (ended, deleted, unknown);
    returns their run ids. An active run's directory is its worker's."""
    if not root.is_dir():
        return []
    names = [p.name for p in root.iterdir()]
    if not names:
        return []
    with Session(engine) as session:
        active = set(
            session.exec(
                select(TrainingRun.id).where(
                    col(TrainingRun.id).in_(names), col(TrainingRun.status).in_(list(ACTIVE))
                )
            )
        )
    swept = [name for name in names if name not in active]
    for name in swept:
        shutil.rmtree(root / name, ignore_errors=True)
    return swept


def engine_url(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


class WorkerLauncher:
    """Starts ``python -m MODULE RUN_ID`` as its own session; stops it by process group."""

    module = "orchestration.worker"

    def __init__(
        self, env: dict[str, str], log_dir: Path, scratch_root: Path | None = None
    ) -> None:
        self.env = env  # secrets (a database password, an env KEK) never go through argv
        self.log_dir = log_dir
        # Where workers keep what they derive from tenants' text (see the module docstring).
        self.scratch_root = (scratch_root or log_dir.parent / "scratch").resolve()
        self.env["FEDTEXT_WORKER_SCRATCH_DIR"] = str(self.scratch_root)
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    def launch(self, run_id: str) -> int:
        self.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.sweep()
        log = open(self.log_dir / f"{run_id}.log", "ab")  # noqa: SIM115 - the child owns it
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", self.module, run_id],
                env={**os.environ, **self.env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        self._children[run_id] = proc
        # Reap the child when it exits, so its PID never lingers as a zombie.
        threading.Thread(target=proc.wait, daemon=True, name=f"reap-{run_id[:8]}").start()
        return proc.pid

    def stop_worker(self, run_id: str, pid: int | None) -> None:
        """Stop the worker's whole group (by the PID on the run: after an API restart too)."""
        child = self._children.pop(run_id, None)
        pid = pid or (child.pid if child else None)
        if pid is None or not pid_alive(pid):
            return
        # The whole group, not just its leader: Ray's processes may outlive the worker.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + CANCEL_GRACE_SECONDS
            while time.monotonic() < deadline and _group_alive(pid):
                time.sleep(0.1)
            if not _group_alive(pid):
                return

    def sweep(self) -> list[str]:  # overridden where the launcher knows the database
        return []


class LocalRunLauncher(WorkerLauncher):
    """Starts simulated runs' workers on this machine for the platform the API serves."""

    def __init__(self, platform: Platform, log_dir: Path, scratch_root: Path | None = None) -> None:
        self.engine = platform.engine
        store = platform.store
        if not isinstance(store, LocalBlobStore | DatabaseBlobStore):
            raise ValueError("The local run launcher needs a file or database blob store.")
        provider = platform.keyring.provider
        env = {
            "FEDTEXT_WORKER_DATABASE_URL": engine_url(platform.engine),
            # Database blobs: the worker writes its models where the API reads them.
            "FEDTEXT_WORKER_BLOB_STORE": "database",
            "FEDTEXT_WORKER_BLOB_DIR": "",
            "FEDTEXT_WORKER_KEY_PROVIDER": provider.name,
        }
        if isinstance(store, LocalBlobStore):
            env["FEDTEXT_WORKER_BLOB_STORE"] = "file"
            env["FEDTEXT_WORKER_BLOB_DIR"] = str(store.root.resolve())
        if isinstance(provider, FileKeyProvider):
            env["FEDTEXT_WORKER_KEK_FILE"] = str(provider.path.resolve())
        elif isinstance(provider, EnvKeyProvider):
            env["FEDTEXT_WORKER_KEK_ENV"] = provider.variable
        elif isinstance(provider, Pkcs11KeyProvider):
            # The worker opens the same token itself (the KEK never leaves it).
            env["FEDTEXT_WORKER_PKCS11_MODULE"] = provider.config.module
            env["FEDTEXT_WORKER_PKCS11_TOKEN"] = provider.config.token_label
            env["FEDTEXT_WORKER_PKCS11_PIN"] = provider.config.pin
            env["FEDTEXT_WORKER_PKCS11_KEY_LABEL"] = provider.config.key_label
        super().__init__(env, log_dir, scratch_root)
        self.sweep()  # what workers killed while no API ran left behind

    def sweep(self) -> list[str]:
        """Remove the scratch directories of runs that are no longer active."""
        return sweep_scratch(self.engine, self.scratch_root)

    def launch(self, run_id: str) -> int:
        pid = super().launch(run_id)
        # The PID is on the run from now on, not only once the worker has imported what it
        # needs (tens of seconds on a loaded machine): the reaper then judges the process,
        # instead of taking a slow start for a worker that "never started".
        beat(self.engine, run_id, worker_pid=pid, worker_host=socket.gethostname())
        return pid

    def check(self, config: dict[str, Any]) -> None:
        """ValueError, with a message for the user, if ``config`` cannot run here."""
        from orchestration.simulation import SimulationConfig, preflight

        # A tenant's share too small for the batch or the noise is refused here, before
        # the run is recorded, reserved or started (example caps are the estimate).
        preflight(SimulationConfig.parse(config))

    def cancel(self, run_id: str, pid: int | None) -> None:
        self.stop_worker(run_id, pid)
        # A killed worker runs no `finally`: its vectors are removed here.
        remove_scratch(self.scratch_root, run_id)


def _group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is left in process group ``pgid`` (Linux)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        # After the command: state, ppid, pgrp, ...
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def _platform_from_env() -> Platform:
    from tenancy.keyring import create_key_provider

    env = os.environ
    provider = create_key_provider(
        env["FEDTEXT_WORKER_KEY_PROVIDER"],
        kek_file=Path(env.get("FEDTEXT_WORKER_KEK_FILE", "kek.key")),
        kek_env=env.get("FEDTEXT_WORKER_KEK_ENV", "FEDTEXT_KEK"),
        pkcs11=Pkcs11Config(
            module=env["FEDTEXT_WORKER_PKCS11_MODULE"],
            token_label=env["FEDTEXT_WORKER_PKCS11_TOKEN"],
            pin=env["FEDTEXT_WORKER_PKCS11_PIN"],
            key_label=env["FEDTEXT_WORKER_PKCS11_KEY_LABEL"],
        )
        if "FEDTEXT_WORKER_PKCS11_MODULE" in env
        else None,
    )
    from tenancy.db import get_engine
    from tenancy.keyring import Keyring

    engine = get_engine(env["FEDTEXT_WORKER_DATABASE_URL"])
    store = create_blob_store(
        env.get("FEDTEXT_WORKER_BLOB_STORE", "file"), engine, Path(env["FEDTEXT_WORKER_BLOB_DIR"])
    )
    return Platform(engine, Keyring(provider), store)


def _heartbeat(engine: Engine, run_id: str, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_SECONDS):
        # A missed beat is not fatal; a long silence marks the run.
        with contextlib.suppress(Exception):
            beat(engine, run_id)


def start_heartbeat(engine: Engine, run_id: str) -> threading.Event:
    """Beat on the run every few seconds until the returned event is set."""
    stop = threading.Event()
    threading.Thread(target=_heartbeat, args=(engine, run_id, stop), daemon=True).start()
    return stop


def _run_scratch(run_id: str) -> Path:
    """The run's fresh, private scratch directory, where the virtual nodes' vector cache
    goes (a leftover of an earlier attempt at this run is removed first)."""
    root = Path(os.environ.get("FEDTEXT_WORKER_SCRATCH_DIR") or "scratch")
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    remove_scratch(root, run_id)
    path = scratch_dir(root, run_id)
    path.mkdir(mode=0o700)
    # The platform's run keeps its vectors here, not in a cache the environment names.
    os.environ["FEDTEXT_FEATURE_CACHE"] = str(path)
    return path


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # `finally` blocks run: the scratch directory goes


def _retry_after_outage(platform: Platform, run_id: str, retries: int, outages: Outages) -> bool:
    """After a failed attempt: start this worker again as a resume (``os.execv``: same PID,
    same process group, so cancel and the reaper still find it) if a database outage
    failed the run and resuming charges nothing twice. False when it does not retry."""
    if retries >= MAX_OUTAGE_RETRIES:
        return False
    why = retry_blocker(platform.engine, run_id, outages)
    if why is not None:
        print(f"Run {run_id}: not retried: {why}", file=sys.stderr, flush=True)
        return False
    delay = OUTAGE_BACKOFF_S * 2**retries
    note = (
        f"Retrying after a database outage (retry {retries + 1} of {MAX_OUTAGE_RETRIES}, "
        f"in {delay:.0f} s): {outages.last}"
    )
    time.sleep(delay)
    if not reopen_for_retry(platform.engine, run_id, note):
        return False  # cancelled (or ended otherwise) meanwhile
    print(f"Run {run_id}: {note}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "orchestration.worker", run_id,
                              "--outage-retries", str(retries + 1)])  # fmt: skip
    return True  # not reached


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_id")
    parser.add_argument(
        "--outage-retries",
        type=int,
        default=0,
        help="Retries so far after database outages (this attempt resumes the run).",
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    platform = _platform_from_env()
    outages = Outages.watch(platform.engine)
    run = claim_run(platform.engine, args.run_id)
    if run is None or run.simulation_json is None:
        print(f"No simulated run {args.run_id}.", file=sys.stderr)
        return 2
    # Beat before the heavy imports below (torch, Flower, Ray: tens of seconds under load).
    stop = start_heartbeat(platform.engine, args.run_id)
    from orchestration.simulation import SimulationConfig, SimulationFailed, resume, simulate

    scratch = _run_scratch(args.run_id)
    try:
        config = SimulationConfig.parse(json.loads(run.simulation_json))
        if args.outage_retries:
            resume(platform, args.run_id)
        else:
            simulate(platform, config, args.run_id)
    except (SimulationFailed, ValueError, TypeError, OperationalError) as exc:
        stop.set()
        shutil.rmtree(scratch, ignore_errors=True)
        print(f"Run {args.run_id} failed: {exc}", file=sys.stderr)
        end_run(platform.engine, args.run_id, RunStatus.FAILED, str(exc))
        _retry_after_outage(platform, args.run_id, args.outage_retries, outages)
        return 1
    finally:
        stop.set()
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"Run {args.run_id} completed: {config.rounds} round(s).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
