"""`fedtext keys rotate-kek` in its own process while a client predicts over real HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from sqlmodel import Session, select

from fedtext.server_thread import BackgroundServer
from serving.app import create_app
from serving.config import ServingConfig
from tenancy.platform import Platform
from tenancy.tables import DataKey
from tests.factories import make_tenant, store_tiny_model


def _cli(platform: Platform, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "FEDTEXT_DATA_DIR": str(tmp_path),
        "FEDTEXT_DATABASE_URL": platform.engine.url.render_as_string(hide_password=False),
    }
    return subprocess.run(
        [sys.executable, "-m", "fedtext.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_predictions_keep_succeeding_while_the_kek_rotates(
    platform: Platform, tmp_path: Path
) -> None:
    acme = make_tenant(platform, "acme")
    store_tiny_model(platform, acme.tenant, name="lstm", seed=0)
    store_tiny_model(platform, acme.tenant, name="other", seed=1)
    # One cached model: alternating between two models decrypts (and unwraps) every time.
    app = create_app(platform, ServingConfig(cache_models=1))
    ok, failures = 0, []
    stop = threading.Event()

    def predict() -> None:
        nonlocal ok
        with httpx.Client(base_url=server.url, headers=acme.predict, timeout=30) as client:
            i = 0
            while not stop.is_set():
                name = ("lstm", "other")[i % 2]
                r = client.post(f"/v1/models/{name}/predict", json={"inputs": ["late again"]})
                if r.status_code == 200:
                    ok += 1
                else:
                    failures.append((r.status_code, r.text[:200]))
                i += 1

    with BackgroundServer(app) as server:
        thread = threading.Thread(target=predict)
        thread.start()
        try:
            time.sleep(0.5)
            started = ok
            results = [_cli(platform, tmp_path, "keys", "rotate-kek", "--grace", "0.2")]
            results.append(_cli(platform, tmp_path, "keys", "rotate-kek", "--grace", "0"))
            during = ok - started
            time.sleep(0.5)
        finally:
            stop.set()
            thread.join(timeout=60)
    for r in results:
        assert r.returncode == 0, r.stderr
    assert "KEK version 2 is current" in results[0].stdout
    assert "KEK version 3 is current" in results[1].stdout
    assert "retired: 2" in results[1].stdout
    assert failures == []
    assert during > 0, "no prediction ran while the KEK rotated"
    with Session(platform.engine) as session:
        assert {r.kek_version for r in session.exec(select(DataKey))} == {3}
    assert platform.keyring.provider.versions() == [3]
    print(f"predictions: {ok} ok, {during} during the rotations, 0 failed")
