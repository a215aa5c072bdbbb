"""Fault on a real Deployment Engine federation: the SuperLink SIGKILLed mid-round.

`fedtext federation coordinator` supervises the SuperLink and the API; this test gives
it a coordinator of its own (the SuperLink dies here, so the shared module fixture of
tests/cli/test_federation_live.py cannot be used). The promise (docs/RELIABILITY.md):

- the coordinator starts the SuperLink again on the same state database; the API keeps
  answering throughout (no request refused or answered 5xx);
- the run ends interrupted, with its reason and the command that resumes it, within a
  stated time of the SuperLink's return;
- every dispatched round is charged exactly once per tenant, no reservation outlives the
  run, `fedtext audit verify` passes;
- the resume command completes the run: finished rounds are not charged again (the round
  in flight at the kill was dispatched twice and is charged twice, as documented).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from sqlmodel import Session, select

from privacy.ledger import PrivacyEvent
from privacy.reservations import outstanding
from runs.lifecycle import active_run_ids
from runs.status import ACTIVE
from tenancy.tables import TrainingRun

# The module fixture, imported: a coordinator of this module's own (its only test kills
# the SuperLink; no other test shares it).
from tests.cli.test_federation_live import (  # noqa: F401 (the fixture, by name)
    API_RUN,
    Federation,
    _follow,
    descendants,
    federation,
    port_is_free,
    wait_for,
)

pytestmark = [pytest.mark.faults, pytest.mark.faults_full, pytest.mark.slow]

# From the SuperLink's return to the run's truthful end (the worker asks Flower every
# 30 s; two asks and a margin on a loaded 2-core machine).
RUN_ENDS_WITHIN_S = 120.0


class Probe:
    """GET /readyz every 0.2 s from a thread: (seconds since start, status; 0 = refused)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.history: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                with urllib.request.urlopen(self.url, timeout=10) as r:
                    code = r.status
            except urllib.error.HTTPError as exc:
                code = exc.code
            except (urllib.error.URLError, OSError):
                code = 0
            self.history.append((time.monotonic() - self.t0, code))

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def _superlink_pid(coordinator_pid: int) -> int | None:
    for pid in descendants(coordinator_pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(part.endswith(b"flower-superlink") for part in cmd[:2]):
            return pid
    return None


def _events(fed: Federation, run_id: str) -> list[PrivacyEvent]:
    with Session(fed.platform.engine) as session:
        return list(session.exec(select(PrivacyEvent).where(PrivacyEvent.run_id == run_id)))


def _row(fed: Federation, run_id: str) -> TrainingRun:
    with Session(fed.platform.engine) as session:
        row = session.get(TrainingRun, run_id)
        assert row is not None
        session.expunge(row)
        return row


def _check_ledger(fed: Federation, run_id: str, redispatched: set[int]) -> Counter[tuple]:
    events = _events(fed, run_id)
    per = Counter((e.tenant_id, e.round, e.purpose) for e in events)
    doubled = {k: n for k, n in per.items() if n > 1 and not (k[1] in redispatched and n == 2)}
    assert doubled == {}, f"charged twice: {doubled}"
    row = _row(fed, run_id)
    tenants = {e.tenant_id for e in events}
    lost = [(t, r) for t in tenants for r in range(1, row.checkpoint_round + 1)
            if per[(t, r, "train")] == 0]  # fmt: skip
    assert lost == [], f"finished rounds without a charge: {lost}"
    if row.status not in ACTIVE:
        # What budget decisions count for these tenants now: nothing of this run (a row of
        # an ended run's reservation may stay; only active runs' reservations hold).
        with Session(fed.platform.engine) as session:
            held = {t: outstanding(session, t, active_runs=active_run_ids(session))
                    for t in tenants}  # fmt: skip
        assert all(v == [] for v in held.values()), held
    return per


def _audit(fed: Federation) -> None:
    audit = subprocess.run(
        [sys.executable, "-m", "fedtext.cli", "audit", "verify"],
        env=fed.env, cwd=fed.root, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert audit.returncode == 0, audit.stdout + audit.stderr


def test_superlink_sigkilled_mid_round(federation: Federation) -> None:  # noqa: F811
    fed = federation
    coordinator = next(p for p in fed.procs if p.name == "coordinator")
    fed.tenant_nodes()
    admin = fed.admin_key("acme")
    globex = fed.admin_key("globex")
    assert fed.api("PUT", "/v1/partners", globex, {"tenants": ["acme"]})[0] == 200
    code, run = fed.api("POST", "/v1/runs", admin, {**API_RUN, "rounds": 3})
    assert code == 202, run
    run_id = run["id"]
    _follow(fed, run_id, admin, lambda b: b["status"] == "running", 300)
    deadline = time.monotonic() + 600
    # Round 1 charged for both tenants: its messages are dispatched (or being dispatched).
    while len(_events(fed, run_id)) < 2:
        assert time.monotonic() < deadline, "no round was dispatched"
        time.sleep(0.5)
    link_port = fed.ports[0]
    with Probe(f"http://127.0.0.1:{fed.ports[1]}/readyz") as probe:
        old = _superlink_pid(coordinator.popen.pid)
        assert old is not None, "no flower-superlink below the coordinator"
        coordinator.remember()
        os.kill(old, signal.SIGKILL)  # a crash: no handler runs
        killed = time.monotonic()
        wait_for(lambda: _superlink_pid(coordinator.popen.pid) not in (None, old), 120,
                 "the SuperLink started again", [coordinator])  # fmt: skip
        wait_for(lambda: not port_is_free(link_port), 120, "the SuperLink's port", [coordinator])
        back = time.monotonic()
        done, _ = _follow(fed, run_id, admin, lambda b: b["status"] not in ACTIVE, 900)
        ended = time.monotonic()
        coordinator.remember()
    statuses = Counter(code for _, code in probe.history)
    # Interrupted, resumable, and it says how.
    assert done["status"] == "interrupted", (done["status"], done["error"])
    assert "--config resume=true" in (done["error"] or ""), done
    assert ended - back < RUN_ENDS_WITHIN_S, (ended - back, done)
    interrupted_at = _row(fed, run_id).checkpoint_round
    charged = _check_ledger(fed, run_id, redispatched=set())
    _audit(fed)
    # The API answered throughout: never refused, never 5xx.
    assert set(statuses) == {200}, statuses
    for node in fed.nodes.values():  # the nodes reconnected by themselves
        assert node.popen.poll() is None, node.output()[-3000:]
    resumed = fed.cli(
        "federation", "run", "--superlink", fed.superlink,
        "--ca", str(fed.creds / "ca" / "ca.crt"), "--run-id", run_id,
        "--config", "resume=true", "--poll", "3", timeout=900,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    row = _row(fed, run_id)
    assert row.status == "completed" and row.checkpoint_round in (0, 3), row.status
    after = _check_ledger(fed, run_id, redispatched={interrupted_at + 1})
    assert sum(after.values()) > sum(charged.values())
    _audit(fed)
    print(
        f"FAULT superlink-sigkill superlink_back_s={back - killed:.1f} "
        f"run_ended_after_return_s={ended - back:.1f} interrupted_after_round={interrupted_at} "
        f"charges_at_interrupt={sum(charged.values())} charges_after_resume={sum(after.values())} "
        f"probes={dict(statuses)} error={done['error']!r}"
    )
