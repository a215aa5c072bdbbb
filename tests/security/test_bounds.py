"""Bounds on a tenant's delta and on its live API keys (issue 24, finding 10).

On old main the operator API took ``budget_delta`` 0.9 and a tenant's admin could mint
keys without end.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from serving.app import create_app
from serving.config import ServingConfig
from tenancy.platform import Platform
from tests.factories import TenantFixture, make_tenant

OPERATOR = "op-" + "x" * 40
MAX_KEYS = 4


@pytest.fixture
def client(platform: Platform) -> Iterator[TestClient]:
    app = create_app(platform, ServingConfig(operator_token=OPERATOR, max_keys_per_tenant=MAX_KEYS))
    with TestClient(app) as c:
        yield c


@pytest.mark.parametrize("delta", [0.9, 0.01, 0.0, -1e-5])
def test_operator_api_refuses_a_tenant_delta_out_of_bounds(
    client: TestClient, delta: float
) -> None:
    r = client.post(
        "/v1/tenants",
        json={"name": "acme", "budget_epsilon": 5, "budget_delta": delta},
        headers={"Authorization": f"Bearer {OPERATOR}"},
    )
    assert r.status_code == 422, r.text
    assert "budget_delta" in r.text
    assert client.get("/v1/tenants", headers={"Authorization": f"Bearer {OPERATOR}"}).json() == []


def test_operator_api_accepts_a_small_delta(client: TestClient) -> None:
    r = client.post(
        "/v1/tenants",
        json={"name": "acme", "budget_epsilon": 5, "budget_delta": 1e-6},
        headers={"Authorization": f"Bearer {OPERATOR}"},
    )
    assert r.status_code == 201, r.text
    assert r.json()["tenant"]["budget_delta"] == 1e-6


def test_cli_refuses_a_tenant_delta_of_09(data_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fedtext.cli", "tenant", "create", "acme", "--budget-delta", "0.9"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert "budget delta should be in (0, 0.001]" in out, out
    assert "Traceback" not in out


def test_keys_per_tenant_are_bounded_and_revoking_frees_a_place(
    client: TestClient, platform: Platform
) -> None:
    acme: TenantFixture = make_tenant(platform, "acme")  # holds 2 keys (admin, predict)
    created = []
    for _ in range(MAX_KEYS - 2):
        r = client.post("/v1/keys", json={"scopes": ["predict"]}, headers=acme.admin)
        assert r.status_code == 201, r.text
        created.append(r.json()["key"]["id"])
    r = client.post("/v1/keys", json={"scopes": ["predict"]}, headers=acme.admin)
    assert r.status_code == 409, r.text
    assert f"already has {MAX_KEYS} live API keys" in r.json()["detail"]
    assert len(client.get("/v1/keys", headers=acme.admin).json()) == MAX_KEYS
    # Another tenant is not affected by acme's count.
    globex = make_tenant(platform, "globex")
    r = client.post("/v1/keys", json={"scopes": ["predict"]}, headers=globex.admin)
    assert r.status_code == 201, r.text
    # A revoked key no longer counts.
    assert client.delete(f"/v1/keys/{created[0]}", headers=acme.admin).status_code == 200
    r = client.post("/v1/keys", json={"scopes": ["admin"]}, headers=acme.admin)
    assert r.status_code == 201, r.text
