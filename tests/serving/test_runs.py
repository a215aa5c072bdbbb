"""Runs over HTTP: a real worker process, live status and metrics, cancel, restart safety."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from orchestration.federation import FederationRunLauncher, federation_run_config, follow
from orchestration.flower import FlowerError, app_config_keys, find_app_dir
from orchestration.worker import LocalRunLauncher
from runs.lifecycle import end_run, pid_alive
from runs.spec import RunSpec
from serving.app import create_app
from serving.config import ServingConfig
from tenancy.certificates import create_credentials
from tenancy.platform import Platform
from tenancy.tables import TrainingRun, utcnow
from tests.factories import agree, make_tenant

TINY_RUN = {
    "participants": ["globex"],
    "rounds": 1,
    "epsilon": 8.0,
    "batch_size": 16,
    "personalize_epochs": 0,
    "max_train_examples": 48,
    "max_test_examples": 16,
    "secure_mode": False,  # the default family, encoder-head
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
        # An unknown tenant gets the answer of one that has not agreed (no enumeration).
        r = c.post("/v1/runs", json={"participants": ["ghost"]}, headers=acme.admin)
        assert r.status_code == 403
        assert "tenant 'ghost' cannot take part (not a partner)" in r.json()["detail"]
        r = c.post("/v1/runs", json={}, headers=acme.admin)
        assert r.status_code == 422 and "at least two tenants" in r.json()["detail"]
        r = c.post("/v1/runs", json={"participants": ["acme"]}, headers=acme.admin)
        assert r.status_code == 422 and "named twice" in r.json()["detail"]


def test_a_participant_is_named_only_with_its_admins_consent(
    platform: Platform, tmp_path: Path
) -> None:
    acme, globex = make_tenant(platform, "acme"), make_tenant(platform, "globex")
    initech = make_tenant(platform, "initech")
    body = {**TINY_RUN, "participants": ["globex", "initech"]}
    with _app(platform, tmp_path) as c:
        r = c.post("/v1/runs", json=body, headers=acme.admin)
        assert r.status_code == 403
        assert r.json()["detail"] == (
            "tenant 'globex' cannot take part (not a partner); tenant 'initech' cannot take "
            "part (not a partner): a tenant takes part in runs of 'acme' only once its admin "
            "lists 'acme' with PUT /v1/partners."
        )
        # ... exactly what a tenant that does not exist gets.
        ghost = c.post("/v1/runs", json={**body, "participants": ["ghost"]}, headers=acme.admin)
        assert (ghost.status_code, ghost.json()["detail"]) == (
            403,
            r.json()["detail"].replace(
                "tenant 'globex' cannot take part (not a partner); tenant 'initech'",
                "tenant 'ghost'",
            ),
        )
        # globex agrees; initech agrees with someone else only.
        assert c.put("/v1/partners", json={"tenants": ["acme"]}, headers=globex.admin).json() == {
            "tenants": ["acme"]
        }
        r = c.put("/v1/partners", json={"tenants": ["globex"]}, headers=initech.admin)
        assert r.status_code == 200
        r = c.post("/v1/runs", json=body, headers=acme.admin)
        assert r.status_code == 403 and "'initech' cannot take part" in r.json()["detail"]
        assert "'globex'" not in r.json()["detail"]
        # Consent is the admin's: a predict key cannot give it, nor can a tenant list itself
        # or an unknown tenant, and nothing is stored by a refused request.
        r = c.put("/v1/partners", json={"tenants": ["acme"]}, headers=initech.predict)
        assert r.status_code == 403
        for names, message in ((["initech"], "its own runs"), (["Not A Name"], "Invalid tenant")):
            r = c.put("/v1/partners", json={"tenants": names}, headers=initech.admin)
            assert r.status_code == 422 and message in r.json()["detail"]
        assert c.get("/v1/partners", headers=initech.admin).json() == {"tenants": ["globex"]}
        # Withdrawn consent holds for the next run.
        assert c.put("/v1/partners", json={"tenants": []}, headers=globex.admin).status_code == 200
        r = c.post("/v1/runs", json={**TINY_RUN}, headers=acme.admin)
        assert r.status_code == 403 and "globex" in r.json()["detail"]


def _dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    return gone.pid


def _running(platform: Platform, owner: str, runs: dict[str, tuple[int, dict[str, Any]]]) -> None:
    """Rows of runs in progress, each with its worker's PID and stored request."""
    with Session(platform.engine) as session:
        for run_id, (pid, request) in runs.items():
            session.add(
                TrainingRun(
                    id=run_id,
                    owner_tenant_id=owner,
                    status="running",
                    worker_pid=pid,
                    worker_host=os.uname().nodename,
                    heartbeat_at=utcnow(),
                    simulation_json=json.dumps(request),
                )
            )
        session.commit()


def test_a_run_whose_worker_died_is_marked_interrupted_at_startup(
    platform: Platform, tmp_path: Path
) -> None:
    acme = make_tenant(platform, "acme")
    dead = _dead_pid()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        request = {"tenants": ["acme", "globex"], "rounds": 2}
        _running(platform, acme.tenant.id, {"gone": (dead, request)})
        _running(platform, acme.tenant.id, {"alive": (alive.pid, request)})
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
    acme, globex = make_tenant(platform, "acme"), make_tenant(platform, "globex")
    agree(platform, globex, "acme")
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
    acme, globex = make_tenant(platform, "acme"), make_tenant(platform, "globex")
    agree(platform, globex, "acme")
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


# ------------------------------------------------------------------ runs on a SuperLink


@pytest.fixture
def ca_cert(tmp_path: Path) -> Path:
    made = create_credentials(tmp_path / "creds", hosts=["127.0.0.1"], tenants=[])
    return made.layout.ca_cert


def _unreachable() -> str:
    with socket.socket() as s:  # a port nothing listens on once it is closed
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _federation_app(platform: Platform, tmp_path: Path, ca: Path) -> TestClient:
    launcher = FederationRunLauncher(platform, tmp_path / "runs", _unreachable(), ca)
    return TestClient(create_app(platform, ServingConfig(), run_launcher=launcher))


def test_a_request_maps_to_the_serverapps_run_config() -> None:
    known = app_config_keys(find_app_dir(None))
    request = {
        "tenants": ["acme", "globex"],
        "rounds": 2,
        "epsilon": 4.0,
        "strategy": "fedprox",
        "batch_size": 16,
        "personalize_epochs": 0,
        "secure_mode": False,
        "model": "lstm",
        "model_config": {"proj_dim": 8, "hidden_dim": 8},
    }
    config = federation_run_config(request, "run-1", known)
    assert set(config) <= set(known)
    assert config["run-id"] == "run-1" and config["participants"] == "acme,globex"
    assert (config["rounds"], config["epsilon"], config["strategy"]) == (2, 4.0, "fedprox")
    assert (config["batch-size"], config["personalize-epochs"]) == (16, 0)
    assert config["secure-mode"] is False
    assert json.loads(config["model-config"]) == {"proj_dim": 8, "hidden_dim": 8}
    # What the ServerApp reads back is the request.
    cfg = RunSpec.from_run_config(config)
    assert cfg.participants == ("acme", "globex") and cfg.family_config["proj_dim"] == 8
    assert "tenants" not in config  # the simulated nodes' key: a real node has its own tenant


def test_simulation_only_and_invalid_requests_are_refused() -> None:
    known = app_config_keys(find_app_dir(None))
    base = {"tenants": ["acme", "globex"]}
    with pytest.raises(ValueError, match="max_train_examples, max_test_examples: only for sim"):
        federation_run_config(
            {**base, "max_train_examples": 48, "max_test_examples": 16}, "r", known
        )
    with pytest.raises(ValueError, match="Unknown strategy 'krum-ish'"):
        federation_run_config({**base, "strategy": "krum-ish"}, "r", known)
    with pytest.raises(ValueError, match="Unknown model family 'cnn'"):
        federation_run_config({**base, "model": "cnn"}, "r", known)
    with pytest.raises(ValueError, match="at least two tenants"):
        federation_run_config({"tenants": ["acme"]}, "r", known)


def test_the_launcher_refuses_a_bad_address_or_ca(platform: Platform, tmp_path: Path) -> None:
    not_a_cert = tmp_path / "ca.crt"
    not_a_cert.write_text("hello")
    with pytest.raises(FlowerError, match="not an address of the form host:port"):
        FederationRunLauncher(platform, tmp_path / "runs", "superlink", not_a_cert)
    with pytest.raises(FlowerError, match=r"CA certificate .* does not exist"):
        FederationRunLauncher(platform, tmp_path / "runs", "127.0.0.1:9092", tmp_path / "no.crt")
    with pytest.raises(ValueError, match="CA certificate"):
        FederationRunLauncher(platform, tmp_path / "runs", "127.0.0.1:9092", not_a_cert)


def test_over_http_simulation_fields_are_422_and_an_unreachable_superlink_503(
    platform: Platform, tmp_path: Path, ca_cert: Path
) -> None:
    acme, globex = make_tenant(platform, "acme"), make_tenant(platform, "globex")
    agree(platform, globex, "acme")
    with _federation_app(platform, tmp_path, ca_cert) as c:
        r = c.post(
            "/v1/runs",
            json={"participants": ["globex"], "partitioning": "topic"},
            headers=acme.admin,
        )
        assert r.status_code == 422 and "partitioning: only for simulated runs" in r.text
        r = c.post("/v1/runs", json={"participants": ["globex"]}, headers=acme.admin)
        assert r.status_code == 503, r.text
        [run] = c.get("/v1/runs", headers=acme.admin).json()
    assert run["status"] == "failed" and run["participants"] == ["acme", "globex"]
    assert "Could not start" in run["error"] and "is unreachable" in run["error"]
    # The connection is the API's own, not the operator's ~/.flwr.
    assert "127.0.0.1" in (tmp_path / "runs" / "flwr" / "config.toml").read_text()


def test_a_federation_run_whose_worker_died_points_at_its_flower_run(
    platform: Platform, tmp_path: Path
) -> None:
    acme = make_tenant(platform, "acme")
    dead = _dead_pid()
    request = {"tenants": ["acme", "globex"], "rounds": 2, "superlink": "127.0.0.1:9092"}
    _running(
        platform,
        acme.tenant.id,
        {"submitted": (dead, {**request, "flower_run_id": 42}), "never": (dead, request)},
    )
    with _app(platform, tmp_path) as c:
        submitted = c.get("/v1/runs/submitted", headers=acme.admin).json()
        never = c.get("/v1/runs/never", headers=acme.admin).json()
    assert submitted["status"] == "interrupted"
    assert "Flower run 42 may still be running on 127.0.0.1:9092" in submitted["error"]
    assert "simulate --resume" not in submitted["error"]
    assert never["status"] == "interrupted" and "never submitted" in never["error"]


def test_the_worker_follows_the_serverapps_record_of_the_run(platform: Platform) -> None:
    with Session(platform.engine) as session:
        session.add(TrainingRun(id="r1", status="running"))
        session.commit()

    def serverapp_completes() -> None:
        with Session(platform.engine) as session:
            row = session.get(TrainingRun, "r1")
            assert row is not None
            row.status = "completed"
            session.add(row)
            session.commit()

    timer = threading.Timer(0.5, serverapp_completes)
    timer.start()
    started = time.monotonic()
    # Flower is not asked within the hour: the row alone ends the wait.
    assert follow(platform.engine, "r1", 7, poll=0.1, flower_every=3600) == "completed"
    assert time.monotonic() - started < 5
    timer.join()
    # An end that is already recorded is kept: a late failure does not overwrite a cancel.
    assert end_run(platform.engine, "r1", "failed", "late") is False


def test_a_cli_run_is_visible_to_the_admins_of_the_tenants_it_charged(
    platform: Platform, tmp_path: Path
) -> None:
    from privacy.db import create_tables
    from privacy.ledger import record_event
    from privacy.params import DPParams
    from runs.lifecycle import record_request
    from tenancy.db import session_scope

    acme, globex, initech = (make_tenant(platform, n) for n in ("acme", "globex", "initech"))
    create_tables(platform.engine)
    # `fedtext simulate` records its run without an owner; round 1 charges both tenants.
    record_request(
        platform.engine, "cli-run", {"tenants": ["acme", "globex"], "rounds": 1}, merge=False
    )
    with session_scope(platform.engine) as session:
        for t in (acme, globex):
            record_event(
                session, tenant_id=t.tenant.id, run_id="cli-run", round=1,
                params=DPParams(1.0, 0.1, 10, 1.0, 1e-5), spec_sha256="0" * 64,
            )  # fmt: skip
    with _app(platform, tmp_path) as c:
        for t in (acme, globex):
            listed = c.get("/v1/runs", headers=t.admin).json()
            assert [r["id"] for r in listed] == ["cli-run"]
            assert listed[0]["participants"] == ["acme", "globex"]
            assert c.get("/v1/runs/cli-run", headers=t.admin).status_code == 200
        # A tenant it did not charge sees nothing of it; only an owner cancels over HTTP.
        assert c.get("/v1/runs", headers=initech.admin).json() == []
        assert c.get("/v1/runs/cli-run", headers=initech.admin).status_code == 404
        assert c.post("/v1/runs/cli-run/cancel", headers=acme.admin).status_code == 404


def test_a_run_too_small_for_its_batch_is_refused_before_it_is_recorded(
    platform: Platform, tmp_path: Path
) -> None:
    acme, globex = make_tenant(platform, "acme"), make_tenant(platform, "globex")
    agree(platform, globex, "acme")
    with _app(platform, tmp_path) as c:
        r = c.post(
            "/v1/runs",
            json={**TINY_RUN, "max_train_examples": 40, "batch_size": 64},
            headers=acme.admin,
        )
        assert r.status_code == 422, r.text
        assert "40 training examples, fewer than the batch size 64" in r.json()["detail"]
        assert "use batch size 8" in r.json()["detail"]
        assert c.get("/v1/runs", headers=acme.admin).json() == []


def test_a_run_says_what_its_epsilon_protects(platform: Platform, tmp_path: Path) -> None:
    """RunPublic names the run's privacy unit and, per user, k (issue 29)."""
    acme = make_tenant(platform, "acme")
    users = {"tenants": ["acme"], "privacy_unit": "user", "max_examples_per_user": 4}
    _running(platform, acme.tenant.id, {"per-user": (os.getpid(), users)})
    _running(platform, acme.tenant.id, {"per-row": (os.getpid(), {"tenants": ["acme"]})})
    with _app(platform, tmp_path) as c:
        user_run = c.get("/v1/runs/per-user", headers=acme.admin).json()
        row_run = c.get("/v1/runs/per-row", headers=acme.admin).json()
    assert (user_run["privacy_unit"], user_run["max_examples_per_user"]) == ("user", 4)
    assert (row_run["privacy_unit"], row_run["max_examples_per_user"]) == ("example", None)
