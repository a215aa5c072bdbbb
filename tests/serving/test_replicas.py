"""Two `fedtext serve` replicas on one PostgreSQL, blobs in the database, no shared disk.

A deploy, a rollback and a key revocation made through one replica, and a tenant
deletion made with the CLI (a third process), take effect in the other replica within
the lookup interval; the deleted tenant's decrypted heads leave the other replica's memory.
"""

from __future__ import annotations

import base64
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from fedtext.bootstrap import platform_from_settings, upgrade_schema
from fedtext.settings import Settings
from models import ModelSpec, build_model, save_weights
from tenancy.db import session_scope
from tenancy.registry import store_model_version
from tenancy.tenants import Scope, create_api_key, create_tenant
from tests.conftest import IN_CI, PG_URL, _empty_postgres

pytestmark = pytest.mark.skipif(
    PG_URL is None and not IN_CI, reason="needs FEDTEXT_TEST_DATABASE_URL (PostgreSQL)"
)

LOOKUP_TTL_S = 0.5
# A change shows at the next refresh: within one interval, plus the refresh itself and
# the polling here (generous: the test machine is shared).
WITHIN_S = 2 * LOOKUP_TTL_S + 2.0
LABELS = ["negative", "neutral", "positive"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    assert PG_URL is not None, "CI must set FEDTEXT_TEST_DATABASE_URL"
    _empty_postgres(PG_URL)
    yield {
        **os.environ,
        "FEDTEXT_DATABASE_URL": PG_URL,
        "FEDTEXT_BLOB_STORE": "database",
        "FEDTEXT_KEY_PROVIDER": "env",
        "FEDTEXT_KEK": base64.b64encode(secrets.token_bytes(32)).decode(),
        "FEDTEXT_OPERATOR_TOKEN": secrets.token_urlsafe(32),
        "FEDTEXT_SERVE_LOOKUP_TTL_S": str(LOOKUP_TTL_S),
        "FEDTEXT_SERVE_ENCODER_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
    }
    _empty_postgres(PG_URL)


class Replica:
    def __init__(self, env: dict[str, str], data_dir: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (data_dir.parent / f"replica-{self.port}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fedtext.cli", "serve", "--port", str(self.port)],
            env={**env, "FEDTEXT_DATA_DIR": str(data_dir)},  # its own folder: no shared disk
            stdout=self.log, stderr=self.log,
        )  # fmt: skip

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"replica exited with {self.proc.returncode}"
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError("replica did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def predict(self, key: str, model: str = "sentiment") -> httpx.Response:
        return httpx.post(
            f"{self.url}/v1/models/{model}/predict",
            json={"inputs": ["the crew was lovely"], "top_k": 3},
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )

    def gauge(self, name: str, token: str) -> float:
        text = httpx.get(
            f"{self.url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10
        ).text
        return sum(
            float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
        )


def _until(check: Callable[[], bool], within: float) -> float:
    """Seconds until ``check()`` holds; fails after ``within`` seconds."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > within:
            raise AssertionError(f"not seen within {within} s")
        time.sleep(0.05)
    return time.monotonic() - started


def _setup(env: dict[str, str], data_dir: Path) -> dict[str, Any]:
    settings = Settings(
        data_dir=data_dir,
        database_url=env["FEDTEXT_DATABASE_URL"],
        key_provider="env",
        blob_store="database",
    )
    os.environ["FEDTEXT_KEK"] = env["FEDTEXT_KEK"]  # this process writes as the replicas read
    platform = platform_from_settings(settings)
    upgrade_schema(platform)
    spec = ModelSpec.create("encoder-head", LABELS)
    out: dict[str, Any] = {}
    with session_scope(platform.engine) as session:
        for name in ("acme", "globex"):
            tenant = create_tenant(session=session, keyring=platform.keyring, name=name)
            _, admin = create_api_key(session=session, tenant=tenant, scopes=[Scope.admin])
            key, predict = create_api_key(session=session, tenant=tenant, scopes=[Scope.predict])
            out[name] = {"id": tenant.id, "admin": admin, "predict": predict, "key_id": key.id}
            for seed in (1, 2):  # v1 deployed, v2 stored
                torch.manual_seed(seed)
                head = build_model(spec)
                with torch.no_grad():
                    for p in head.parameters():
                        p.normal_()
                store_model_version(
                    session=session, keyring=platform.keyring, store=platform.store,
                    tenant=tenant, name="sentiment", spec_json=spec.to_json(),
                    weights=save_weights(head), deploy=seed == 1,
                )  # fmt: skip
    return out


def test_changes_through_one_replica_or_the_cli_reach_the_other_within_the_interval(
    env: dict[str, str], tmp_path: Path
) -> None:
    tenants = _setup(env, tmp_path / "setup")
    assert not (tmp_path / "setup" / "blobs").exists()  # the heads live in PostgreSQL
    acme, globex = tenants["acme"], tenants["globex"]
    a, b = Replica(env, tmp_path / "a"), Replica(env, tmp_path / "b")
    try:
        a.wait_ready()
        b.wait_ready()
        for replica in (a, b):
            for t in (acme, globex):
                r = replica.predict(t["predict"])
                assert r.status_code == 200, r.text
                assert r.json()["version"] == 1
        token = env["FEDTEXT_OPERATOR_TOKEN"]
        assert b.gauge("fedtext_model_cache_models", token) == 2  # both tenants' heads

        # A deploy through A: B answers with the new version within the interval.
        admin = {"Authorization": f"Bearer {acme['admin']}"}
        r = httpx.post(f"{a.url}/v1/models/sentiment/versions/2/deploy", headers=admin)
        assert r.status_code == 200, r.text
        _until(lambda: b.predict(acme["predict"]).json()["version"] == 2, WITHIN_S)
        # A rollback through A, likewise.
        r = httpx.post(f"{a.url}/v1/models/sentiment/rollback", headers=admin, json={})
        assert r.status_code == 200, r.text
        _until(lambda: b.predict(acme["predict"]).json()["version"] == 1, WITHIN_S)

        # A key revoked through A stops working on B.
        r = httpx.delete(f"{a.url}/v1/keys/{acme['key_id']}", headers=admin)
        assert r.status_code == 200, r.text
        _until(lambda: b.predict(acme["predict"]).status_code == 401, WITHIN_S)

        # globex deleted with the CLI (another process): its decrypted heads leave B.
        loaded = b.gauge("fedtext_model_cache_models", token)
        assert b.predict(globex["predict"]).status_code == 200
        cli = subprocess.run(
            [sys.executable, "-m", "fedtext.cli", "tenant", "delete", "globex", "--yes"],
            env={**env, "FEDTEXT_DATA_DIR": str(tmp_path / "cli")},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert cli.returncode == 0, cli.stderr
        waited = _until(lambda: b.gauge("fedtext_model_cache_models", token) < loaded, WITHIN_S)
        assert b.gauge("fedtext_model_cache_models", token) == loaded - 1
        assert b.predict(globex["predict"]).status_code == 401
        # A learns it from the same change feed, on its own refresh tick.
        _until(lambda: a.predict(globex["predict"]).status_code == 401, WITHIN_S)
        print(f"deleted tenant's head evicted from the other replica after {waited:.2f} s")
    finally:
        a.stop()
        b.stop()
