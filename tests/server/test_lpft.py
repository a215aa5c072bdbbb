"""LP-FT: a minilm run starts from a completed encoder-head run's final global DP head."""

from __future__ import annotations

import json

import pytest
import torch

from models import build_model, save_weights
from runs.spec import RunSpec
from server.checkpoint import save_checkpoint
from server.errors import RunFailed
from server.rounds import start_from_head
from tenancy.db import session_scope
from tenancy.errors import NotFound
from tenancy.platform import Platform
from tenancy.rotation import delete_tenant
from tenancy.tables import TrainingRun, utcnow
from tests.factories import make_tenant

LABELS = "negative,neutral,positive"


def completed_head_run(platform: Platform, run_id: str, labels: str = LABELS) -> torch.Tensor:
    cfg = RunSpec.from_run_config({"run-id": run_id, "labels": labels})
    assert cfg.model == "encoder-head"
    torch.manual_seed(1)
    model = build_model(cfg.spec())
    with torch.no_grad():
        model.head[0].weight.normal_()
    with session_scope(platform.engine) as session:
        run = TrainingRun(
            id=run_id,
            status="completed",
            config_json=json.dumps(cfg.public()),
            finished_at=utcnow(),
        )
        save_checkpoint(platform, run, cfg.rounds, save_weights(model))
        session.add(run)
    return model.head[0].weight.detach().clone()


def minilm_config(run_id: str, **extra: str) -> RunSpec:
    return RunSpec.from_run_config(
        {
            "model": "minilm",
            "model-config": json.dumps({"normalize": True}),
            "init-head-run": run_id,
            **extra,
        }
    )


def test_a_minilm_run_starts_from_the_heads_final_weights(sqlite_platform: Platform) -> None:
    weight = completed_head_run(sqlite_platform, "head-run")
    cfg = minilm_config("head-run")
    model = build_model(cfg.spec())
    assert not torch.equal(model.head.weight, weight)
    start_from_head(sqlite_platform, cfg, model)
    assert torch.equal(model.head.weight, weight)


def test_a_kept_head_goes_when_one_of_its_tenants_is_deleted(sqlite_platform: Platform) -> None:
    acme = make_tenant(sqlite_platform, "acme")
    completed_head_run(sqlite_platform, "head-run")
    with session_scope(sqlite_platform.engine) as session:
        run = session.get(TrainingRun, "head-run")
        assert run is not None and run.checkpoint_blob
        blob = run.checkpoint_blob
        run.plans_json = json.dumps({"acme": {"tenant_id": acme.tenant.id}})
        session.add(run)
    delete_tenant(
        sqlite_platform.engine, sqlite_platform.keyring, sqlite_platform.store,
        tenant_id=acme.tenant.id,
    )  # fmt: skip
    with pytest.raises(ValueError, match="no completed encoder-head run"):
        cfg = minilm_config("head-run")
        start_from_head(sqlite_platform, cfg, build_model(cfg.spec()))
    with pytest.raises(NotFound):
        sqlite_platform.store.get(blob)


def test_lpft_refuses_what_does_not_fit(sqlite_platform: Platform) -> None:
    completed_head_run(sqlite_platform, "two-labels", labels="bad,good")
    with pytest.raises(RunFailed, match="labels"):
        cfg = minilm_config("two-labels")
        start_from_head(sqlite_platform, cfg, build_model(cfg.spec()))
    with pytest.raises(ValueError, match="no completed encoder-head run"):
        cfg = minilm_config("nope")
        start_from_head(sqlite_platform, cfg, build_model(cfg.spec()))
    with pytest.raises(ValueError, match="normalize"):
        RunSpec.from_run_config({"model": "minilm", "init-head-run": "head-run"})
