"""One metric, named the same, on Runs and Models: the released figures with their
uncertainty, as the run stored them on the version."""

from __future__ import annotations

import json
import random

import torch
from fastapi.testclient import TestClient

from models import build_model, save_weights
from privacy.evaluation import confusion_counts
from privacy.uncertainty import released_uncertainty
from server.release import released_metrics
from serving.app import create_app
from serving.config import ServingConfig
from tenancy.db import session_scope
from tenancy.platform import Platform
from tenancy.registry import store_model_version
from tenancy.tables import RoundMetric, TrainingRun
from tests.factories import make_tenant, tiny_spec


def _release(n: int, accuracy: float, rng: random.Random) -> dict[str, float]:
    truth = [t % 3 for t in range(n)]
    pred = [t if rng.random() < accuracy else (t + 1) % 3 for t in truth]
    counts = confusion_counts(truth, pred, 3)
    return released_uncertainty([c + rng.gauss(0, 10.0) for c in counts], 3, 10.0)


def test_runs_and_models_show_the_same_figures_with_their_uncertainty(
    sqlite_platform: Platform,
) -> None:
    platform = sqlite_platform
    acme = make_tenant(platform, "acme")
    rng = random.Random(5)
    glob, pers = _release(45, 0.7, rng), _release(45, 0.7, rng)
    metrics, choice = released_metrics(glob, pers, trained_personal=True)
    metrics.update(
        train_examples=255,
        model_choice=choice,
        uncertainty_warning="The 95% interval of accuracy is wide",
    )
    torch.manual_seed(0)
    with session_scope(platform.engine) as session:
        row = store_model_version(
            session=session,
            keyring=platform.keyring,
            store=platform.store,
            tenant=acme.tenant,
            name="m",
            spec_json=tiny_spec().to_json(),
            weights=save_weights(build_model(tiny_spec())),
            run_id="r1",
            metrics={**metrics, "personalized": False, "deploy": {"reason": "first version"}},
            deploy=True,
        )
        version = row.version
        entry = {"personalized": False, "version": version, "deploy": {"reason": "first version"}}
        summary = {"tenants": {"acme": {**metrics, **entry}}}
        session.add(
            TrainingRun(
                id="r1",
                status="completed",
                owner_tenant_id=acme.tenant.id,
                summary_json=json.dumps(summary),
                config_json=json.dumps({"rounds": 1}),
            )
        )
        session.flush()  # the run row before its round rows (foreign key)
        for phase, rnd, fig in (("evaluate", 1, glob), ("personalize", 2, pers)):
            session.add(
                RoundMetric(
                    run_id="r1",
                    tenant_id=acme.tenant.id,
                    round=rnd,
                    phase=phase,
                    examples=round(fig["examples"]),
                    accuracy=fig["accuracy"],
                    macro_f1=fig["macro_f1"],
                )
            )
    with TestClient(create_app(platform, ServingConfig())) as client:
        run = client.get("/v1/runs/r1", headers=acme.admin).json()
        (listed,) = client.get("/v1/models/m/versions", headers=acme.admin).json()
    result, released = run["result"], listed["released"]
    # The same figures, named the same, on Runs and Models; the global model is kept
    # (the personalized one is not significantly better on 45 rows).
    assert result == released
    assert result["model"] == "global" and result["version"] == version
    for name in ("accuracy", "macro_f1"):
        assert result[name] == glob[name]
        assert result[f"{name}_low"] <= result[name] <= result[f"{name}_high"]
        assert result[f"{name}_sd"] == glob[f"{name}_sd"] > 0.1  # 45 rows, noise SD 10
    assert result["confidence"] == 0.95 and result["test_examples_sd"] == 30.0
    assert "wide" in result["uncertainty_warning"]
    assert "same test split" in result["model_choice"]
    assert result["deploy_reason"] == "first version"
    # Each final-phase round row carries its model's interval.
    rows = {m["phase"]: m for m in run["metrics"]}
    assert rows["evaluate"]["accuracy_low"] == glob["accuracy_low"]
    assert rows["personalize"]["macro_f1_high"] == pers["macro_f1_high"]
    assert rows["evaluate"]["examples_sd"] == 30.0
