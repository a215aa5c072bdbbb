"""Fault on a real Deployment Engine federation: one SuperNode SIGKILLed mid-round.

Uses the SuperLink, SuperNodes and coordinator API of tests/cli/test_federation_live.py
(its module fixture, imported). The promise: the run ends in a truthful status
(completed when the restarted node rejoins in time, else failed or interrupted with its
reason), no round is charged twice, the rounds it finished are charged, `fedtext audit
verify` passes, and the API keeps answering.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from sqlmodel import Session, select

from privacy.ledger import PrivacyEvent
from tenancy.tables import TrainingRun
from tests.cli.test_federation_live import (  # noqa: F401 (the fixture, by name)
    API_RUN,
    Federation,
    _follow,
    federation,
)

pytestmark = [pytest.mark.faults, pytest.mark.faults_full, pytest.mark.slow]


def _charges(fed: Federation, run_id: str) -> int:
    with Session(fed.platform.engine) as session:
        return len(list(session.exec(select(PrivacyEvent).where(PrivacyEvent.run_id == run_id))))


def test_one_supernode_sigkilled_mid_round(federation: Federation) -> None:  # noqa: F811
    federation.tenant_nodes()
    admin = federation.admin_key("acme")
    globex = federation.admin_key("globex")
    assert federation.api("PUT", "/v1/partners", globex, {"tenants": ["acme"]})[0] == 200
    code, run = federation.api("POST", "/v1/runs", admin, {**API_RUN, "rounds": 3})
    assert code == 202, run
    _follow(federation, run["id"], admin, lambda b: b["status"] == "running", 300)
    # Inside round 1: the round's releases are charged before its messages are dispatched.
    deadline = time.monotonic() + 600
    while not _charges(federation, run["id"]):
        assert time.monotonic() < deadline, "no round was dispatched"
        time.sleep(0.5)
    node = federation.nodes.pop("globex")
    node.remember()
    os.killpg(node.popen.pid, signal.SIGKILL)  # the node and its clientapp processes
    node.popen.wait()
    killed_at = time.monotonic()
    federation.nodes["globex"] = federation.node("globex", name="node-globex-restarted")
    done, _seen = _follow(
        federation, run["id"], admin, lambda b: b["status"] not in ("created", "running"), 900
    )
    took = time.monotonic() - killed_at
    assert done["status"] in ("completed", "failed", "interrupted"), done
    if done["status"] != "completed":
        assert done["error"], done  # an unfinished run says why
    with Session(federation.platform.engine) as session:
        events = list(session.exec(select(PrivacyEvent).where(PrivacyEvent.run_id == run["id"])))
        row = session.get(TrainingRun, run["id"])
        assert row is not None
    per = Counter((e.tenant_id, e.round, e.purpose) for e in events)
    assert [k for k, n in per.items() if n > 1] == [], per
    tenants = {e.tenant_id for e in events}
    for t in tenants:
        for r in range(1, (row.checkpoint_round or 0) + 1):
            assert per[(t, r, "train")] == 1, (t, r, per)
    audit = subprocess.run(
        [sys.executable, "-m", "fedtext.cli", "audit", "verify"],
        env=federation.env, cwd=federation.root, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert audit.returncode == 0, audit.stdout + audit.stderr
    code, _ = federation.api("GET", f"/v1/runs/{run['id']}", admin)
    assert code == 200
    print(
        f"FAULT supernode-sigkill status={done['status']} error={done.get('error')!r} "
        f"charges={len(events)} run_ended_after_s={took:.1f}"
    )
