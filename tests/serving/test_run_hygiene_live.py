"""Cancels of real run workers over HTTP (issue 24, findings 8 and 10).

The API's reaper runs on a timer; here it runs exactly when the race of the finding needs
it: right after the cancel has stopped the worker and before the cancel is recorded. On
old main that made the run 'interrupted' (offered for resume), and the cancelled run's
sentence vectors stayed in /tmp/fedtext-features-*.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from orchestration.worker import LocalRunLauncher
from runs.lifecycle import reap_orphaned_runs
from serving.app import create_app
from serving.config import ServingConfig
from tenancy.platform import Platform
from tenancy.tables import TrainingRun
from tests.factories import agree, make_tenant

pytestmark = pytest.mark.slow

OPERATOR = "op-" + "y" * 40
TINY_RUN = {
    "participants": ["globex"],
    "rounds": 20,
    "epsilon": 8.0,
    "batch_size": 16,
    "personalize_epochs": 0,
    "max_train_examples": 48,
    "max_test_examples": 16,
    "secure_mode": False,  # the default family, encoder-head
}


class ReapingLauncher(LocalRunLauncher):
    """The real launcher; the API's reaper timer fires right after a worker is stopped."""

    def stop_worker(self, run_id: str, pid: int | None) -> None:
        super().stop_worker(run_id, pid)
        reap_orphaned_runs(self.engine)


@pytest.fixture
def private_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The workers' TMPDIR (short: Ray's socket paths must stay under 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="ftx-h4-"))
    monkeypatch.setenv("TMPDIR", str(path))
    yield path
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _vectors(*roots: Path) -> list[Path]:
    return [p for root in roots for p in root.rglob("*.safetensors")]


def _wait(what: str, check, timeout: float):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _worker_pid(platform: Platform, run_id: str) -> int | None:
    with Session(platform.engine) as session:
        row = session.get(TrainingRun, run_id)
        return row.worker_pid if row is not None else None


def test_cancels_of_real_workers_are_cancelled_and_leave_no_vectors(
    sqlite_platform: Platform, tmp_path: Path, private_tmp: Path
) -> None:
    # The database does not matter here (tests/security/test_run_hygiene.py runs the
    # transitions on both): SQLite only, this test is minutes of real workers.
    platform = sqlite_platform
    acme = make_tenant(platform, "acme", budget_epsilon=50)
    globex = make_tenant(platform, "globex", budget_epsilon=50)
    agree(platform, globex, "acme")
    data = tmp_path / "data"
    launcher = ReapingLauncher(platform, data / "runs", data / "scratch")
    app = create_app(platform, ServingConfig(operator_token=OPERATOR), run_launcher=launcher)
    with TestClient(app) as c:
        # 1. The admin cancels once the nodes have written their sentence vectors.
        r = c.post("/v1/runs", json=TINY_RUN, headers=acme.admin)
        assert r.status_code == 202, r.text
        run_id = r.json()["id"]
        _wait("the nodes' vectors on disk", lambda: _vectors(tmp_path, private_tmp), 240)
        key_prefix = acme.admin["Authorization"].split("_")[1]
        r = c.post(f"/v1/runs/{run_id}/cancel", headers=acme.admin)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "cancelled", body
        assert body["error"] == f"Cancelled by admin key {key_prefix}."
        assert _vectors(tmp_path, private_tmp) == []
        assert not (data / "scratch" / run_id).exists()
        with Session(platform.engine) as session:
            row = session.get(TrainingRun, run_id)
            assert row is not None and row.cancelled_by == f"admin key {key_prefix}"
            assert row.checkpoint_blob is None
        assert c.post(f"/v1/runs/{run_id}/cancel", headers=acme.admin).status_code == 409

        # 2. Deleting a participant cancels its run in progress (by the operator).
        r = c.post("/v1/runs", json=TINY_RUN, headers=acme.admin)
        assert r.status_code == 202, r.text
        second = r.json()["id"]
        _wait("the worker", lambda: _worker_pid(platform, second), 120)
        r = c.delete(
            f"/v1/tenants/{globex.tenant.id}", headers={"Authorization": f"Bearer {OPERATOR}"}
        )
        assert r.status_code == 200, r.text
        run = c.get(f"/v1/runs/{second}", headers=acme.admin).json()
        assert run["status"] == "cancelled", run
        assert run["error"] == "Cancelled by operator (tenant deletion)."
        assert _vectors(tmp_path, private_tmp) == []
        assert not any((data / "scratch").iterdir())
