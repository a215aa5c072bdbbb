"""The SDK sets a tenant's own say: partner consent (PUT /v1/partners) and its policy
(PUT /v1/policy), sync and async, against a real server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedtext.server_thread import BackgroundServer
from orchestration.worker import LocalRunLauncher
from sdk import ApiError, AsyncClient, Client, InvalidRequest
from serving.app import create_app
from serving.config import ServingConfig
from tenancy.platform import Platform
from tests.factories import make_tenant


@pytest.fixture
def api(sqlite_platform: Platform, tmp_path: Path) -> Iterator[str]:
    launcher = LocalRunLauncher(sqlite_platform, tmp_path / "runs")
    app = create_app(sqlite_platform, ServingConfig(), run_launcher=launcher)
    with BackgroundServer(app) as server:
        yield server.url


def test_consent_and_policy_are_set_through_the_sdk(api: str, sqlite_platform: Platform) -> None:
    acme, globex = make_tenant(sqlite_platform, "acme"), make_tenant(sqlite_platform, "globex")
    with Client(api, globex.admin_key) as partner:
        with pytest.raises(ApiError) as refused:  # acme has not agreed yet
            partner.create_run(["acme"], rounds=1)
        assert refused.value.status == 403 and "not a partner" in refused.value.message
    with Client(api, acme.admin_key) as admin:
        assert admin.partners().tenants == []
        assert admin.set_partners(["globex"]).tenants == ["globex"]
        assert admin.set_partners(["globex"]).tenants == ["globex"]  # safe to repeat
        assert admin.partners().tenants == ["globex"]
        before = admin.policy()
        changed = admin.set_policy(max_epsilon=2.5, deploy="never")
        assert changed.max_epsilon == 2.5 and changed.deploy == "never"
        assert changed.families == before.families  # left out: kept
        assert admin.set_policy(clear_max_epsilon=True).max_epsilon is None
        with pytest.raises(InvalidRequest) as invalid:
            admin.set_policy(deploy="sometimes")
        assert invalid.value.status == 422

    async def withdraw() -> list[str]:
        async with AsyncClient(api, acme.admin_key) as admin:
            await admin.set_partners([])
            return (await admin.partners()).tenants

    assert asyncio.run(withdraw()) == []
