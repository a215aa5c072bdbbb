"""Runs over HTTP: a real worker process, live status and metrics, cancel, restart safety."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from fedtext.runs_worker import LocalRunLauncher
from serving.app import create_app
from serving.config import ServingConfig
from tenancy.platform import Platform
from tenancy.runs import pid_alive
from tenancy.tables import TrainingRun, utcnow
from tests.factories import make_tenant

TINY_RUN = {
    "participants": ["globex"],
    "rounds": 1,
    "epsilon": 8.0,
    "batch_size": 16,
    "personalize_epochs": 0,
    "max_train_examples": 48,
    "max_test_examples": 16,
    "secure_mode": False,
    "model_config": {"proj_dim": 8, "hidden_dim": 8},
}


def _app(platform: Platform, tmp_path: Path) -> TestClient:
    launcher = LocalRunLauncher(platform, tmp_path / "runs")
    return TestClient(create_app(platform, ServingConfig(), run_launcher=launcher))


def _wait(client: TestClient, url: str, headers: dict[str, str], until, timeout: float):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(url, headers=headers).json()
        if until(body):
            return body
        time.sleep(0.5)
    raise AssertionError(f"timed out; last: {body}")


def test_participants_must_exist_and_the_caller_is_always_in(
    platform: Platform, tmp_path: Path
) -> None:
    acme = make_tenant(platform, "acme")
    with _app(platform, tmp_path) as c:
        r = c.post("/v1/runs", json={"participants": ["ghost"]}, headers=acme.admin)
        assert r.status_code == 422 and "Unknown tenant(s): ghost" in r.json()["detail"]
        r = c.post("/v1/runs", json={}, headers=acme.admin)
        assert r.status_code == 422 and "at least two tenants" in r.json()["detail"]
        r = c.post("/v1/runs", json={"participants": ["acme"]}, headers=acme.admin)
        assert r.status_code == 422 and "named twice" in r.json()["detail"]


def test_a_run_whose_worker_died_is_marked_interrupted_at_startup(
    platform: Platform, tmp_path: Path
) -> None:
    acme = make_tenant(platform, "acme")
    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        with Session(platform.engine) as session:
            for run_id, pid in (("gone", dead.pid), ("alive", alive.pid)):
                session.add(
                    TrainingRun(
                        id=run_id,
                        owner_tenant_id=acme.tenant.id,
                        status="running",
                        worker_pid=pid,
                        worker_host=os.uname().nodename,
                        heartbeat_at=utcnow(),
                        simulation_json=json.dumps({"tenants": ["acme", "globex"], "rounds": 2}),
                    )
                )
            session.commit()
        with _app(platform, tmp_path) as c:  # the API (re)starts
            gone = c.get("/v1/runs/gone", headers=acme.admin).json()
            kept = c.get("/v1/runs/alive", headers=acme.admin).json()
    finally:
        alive.kill()
        alive.wait()
    assert gone["status"] == "interrupted"
    assert "fedtext simulate --resume gone" in gone["error"]
    assert kept["status"] == "running"


@pytest.mark.slow
def test_a_run_starts_reports_metrics_and_completes(platform: Platform, tmp_path: Path) -> None:
    acme, _ = make_tenant(platform, "acme"), make_tenant(platform, "globex")
    with _app(platform, tmp_path) as c:
        r = c.post("/v1/runs", json=TINY_RUN, headers=acme.admin)
        assert r.status_code == 202, r.text
        run = r.json()
        assert run["participants"] == ["acme", "globex"] and run["status"] == "created"
        url = f"/v1/runs/{run['id']}"
        done = _wait(c, url, acme.admin, lambda b: b["status"] not in ("created", "running"), 420)
    log = (tmp_path / "runs" / f"{run['id']}.log").read_text()[-2000:]
    assert done["status"] == "completed", (done, log)
    assert {m["phase"] for m in done["metrics"]} == {"train", "evaluate"}
    assert all(m["round"] == 1 for m in done["metrics"])


@pytest.mark.slow
def test_cancel_stops_the_worker_and_its_children(platform: Platform, tmp_path: Path) -> None:
    acme, _ = make_tenant(platform, "acme"), make_tenant(platform, "globex")
    with _app(platform, tmp_path) as c:
        run = c.post("/v1/runs", json={**TINY_RUN, "rounds": 20}, headers=acme.admin).json()
        url = f"/v1/runs/{run['id']}"
        _wait(c, url, acme.admin, lambda b: b["heartbeat_at"] is not None, 120)
        with Session(platform.engine) as session:
            row = session.get(TrainingRun, run["id"])
            assert row is not None and row.worker_pid
            pid = row.worker_pid
        r = c.post(f"{url}/cancel", headers=acme.admin)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "cancelled"
        assert not pid_alive(pid)
        # No live process is left in the worker's session (exited children may stay
        # zombies for a moment until init reaps them; they hold nothing).
        group = subprocess.run(
            ["ps", "-o", "stat=", "-s", str(pid)], capture_output=True, text=True
        )
        assert [st for st in group.stdout.split() if not st.startswith("Z")] == []
        assert c.post(f"{url}/cancel", headers=acme.admin).status_code == 409
        time.sleep(1)
        assert c.get(url, headers=acme.admin).json()["status"] == "cancelled"
