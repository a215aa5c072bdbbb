"""Finding 2 of issue 24 end to end: a partner's run with ``deploy: always`` and a wild
learning rate does not replace another tenant's serving version unless that tenant's own
policy allows it. A real simulated run (Flower Simulation Engine, Opacus), real tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlmodel import Session

from fedtext.bootstrap import platform_from_settings, upgrade_schema
from fedtext.settings import Settings
from orchestration.simulation import SimulationConfig, simulate
from privacy.ledger import tenant_events
from tenancy.db import session_scope
from tenancy.governance import set_policy
from tenancy.registry import deployed_version
from tenancy.tenants import create_tenant
from tests.factories import TINY_LSTM, store_tiny_model

pytestmark = pytest.mark.slow


def test_a_partners_deploy_always_run_leaves_another_tenants_serving_version(
    tmp_path: Path,
) -> None:
    platform = platform_from_settings(Settings(data_dir=tmp_path))
    upgrade_schema(platform)
    with session_scope(platform.engine) as session:
        tenants = {
            name: create_tenant(session=session, keyring=platform.keyring, name=name)
            for name in ("acme", "globex", "initech")
        }
        # initech's admin lets any run it joins deploy at once; globex keeps the default.
        set_policy(session=session, tenant_id=tenants["initech"].id, actor="test", deploy="always")
    for name in ("globex", "initech"):
        assert store_tiny_model(platform, tenants[name]).version == 1
    config = SimulationConfig(
        tenants=["acme", "globex", "initech"],
        rounds=1,
        epsilon=3.0,
        model="lstm",
        batch_size=16,
        local_epochs=1,
        learning_rate=100.0,  # the review's partner: a model that answers one class
        max_train_examples=48,
        max_test_examples=16,
        personalize_epochs=0,
        min_nodes=2,
        secure_mode=False,
        deploy="always",
        model_config=TINY_LSTM,
    )
    summary = simulate(platform, config).summary["tenants"]
    assert summary["globex"]["deploy"]["policy"] == "if-better"
    assert summary["initech"]["deploy"]["policy"] == "always"
    with Session(platform.engine) as session:
        serving = {
            name: deployed_version(session=session, tenant_id=t.id, name="lstm")
            for name, t in tenants.items()
        }
        # globex's v1 still serves; v2 waits for its admin. initech's policy allowed it.
        assert serving["globex"] is not None and serving["globex"].version == 1
        assert serving["initech"] is not None and serving["initech"].version == 2
        assert serving["acme"] is not None  # its first version (if-better deploys a first)
        applied = json.loads(tenant_events(session, tenants["globex"].id)[0].applied_json)
    assert applied["deploy"] == "if-better" and applied["secure_mode"] is False
