"""A real simulated run: what the coordinator holds is DP output, charged and signed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlmodel import Session, select

from fedtext.bootstrap import platform_from_settings, upgrade_schema
from fedtext.settings import Settings
from orchestration.simulation import SimulationConfig, simulate
from privacy.heads import last_signed_head, platform_key_ids, verify_head
from privacy.ledger import PrivacyEvent, budget_changes, tenant_events
from privacy.reservations import outstanding
from runs.lifecycle import active_run_ids
from tenancy.db import session_scope
from tenancy.tables import ModelVersion, RoundMetric, Tenant, TrainingRun
from tenancy.tenants import create_tenant

pytestmark = pytest.mark.slow
TENANTS = ["acme", "globex", "initech"]


def test_a_run_releases_only_dp_outputs_charges_them_and_signs_the_heads(tmp_path: Path) -> None:
    platform = platform_from_settings(Settings(data_dir=tmp_path))
    upgrade_schema(platform)
    with session_scope(platform.engine) as session:
        for name in TENANTS:
            create_tenant(session=session, keyring=platform.keyring, name=name)
    config = SimulationConfig(
        tenants=TENANTS,
        rounds=1,
        epsilon=3.0,
        model="lstm",
        partitioning="iid",
        batch_size=16,
        local_epochs=1,
        max_train_examples=48,
        max_test_examples=16,
        personalize_epochs=1,
        inject_fault="globex:1",
        min_nodes=2,
        secure_mode=False,
        model_config={"proj_dim": 8, "hidden_dim": 8, "dropout": 0.0},
    )
    summary = simulate(platform, config).summary
    # A node's failure reaches the coordinator as its code, never its text.
    assert "round 1 globex: injected-fault" in summary["failed"]
    assert "injected fault for" not in json.dumps(summary)
    assert "DP-released" in summary["metrics_release"]
    for name in TENANTS:
        t = summary["tenants"][name]
        assert t["metrics_release"]["noise_sd"] == 10.0 and t["metrics_release"]["matrices"] == 2
        assert 0 <= t["global_accuracy"] <= 1 and 0 <= t["personalized_macro_f1"] <= 1
        assert isinstance(t["test_examples"], int)  # the released (noised) total
    with Session(platform.engine) as session:
        ids = {t.name: t.id for t in session.exec(select(Tenant))}
        for name in TENANTS:
            events = tenant_events(session, ids[name])
            # Round 1, then personalization (named as such, not a round) and the
            # evaluation release, both charged with the final phase (recorded as 2).
            assert [(e.round, e.purpose) for e in events] == [
                (1, "train"),
                (2, "personalize"),
                (2, "evaluate"),
            ]
            assert (events[2].sample_rate, events[2].steps, events[2].clip_norm) == (1.0, 2, 1.0)
            # Everything planned was charged or released: nothing stays reserved.
            assert outstanding(session, ids[name], active_runs=active_run_ids(session)) == []
            signed = last_signed_head(session, ids[name])
            assert signed is not None and signed.head.ledger_seq == 3
            tenant = session.get(Tenant, ids[name])
            assert tenant is not None
            assert (
                verify_head(
                    signed,
                    events=events,
                    changes=budget_changes(session, ids[name]),
                    budget_epsilon=tenant.budget_epsilon,
                    budget_delta=tenant.budget_delta,
                    trusted_keys=platform_key_ids(platform.keyring, [1]),
                )
                == []
            )
        train_rows = session.exec(select(RoundMetric).where(RoundMetric.phase == "train")).all()
        assert train_rows and all(r.loss is None and r.accuracy is None for r in train_rows)
        assert {r.tenant_id for r in train_rows} == {ids["acme"], ids["initech"]}
        run = session.exec(select(TrainingRun)).one()
        plans = json.loads(run.plans_json)
        assert plans["acme"]["evaluation"]["noise_multiplier"] == 10.0
        assert plans["acme"]["num_test"] == 0  # never reported
        version = session.exec(select(ModelVersion)).first()
        assert version is not None
        assert json.loads(version.metrics_json)["metrics_release"]["noise_sd"] == 10.0
        assert session.exec(select(PrivacyEvent)).first() is not None
