"""The API's choices are enums in /openapi.json with their defaults (the console builds its
run form from them)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from runs.spec import DEPLOY_POLICIES, PARTITIONERS, STRATEGIES
from serving.app import create_app
from serving.config import ServingConfig
from tenancy.platform import Platform


def test_run_create_lists_family_strategy_partitioning_and_deploy_enums(
    sqlite_platform: Platform,
) -> None:
    with TestClient(create_app(sqlite_platform, ServingConfig())) as client:
        schema = client.get("/openapi.json").json()
    props = schema["components"]["schemas"]["RunCreate"]["properties"]
    expected = {
        "model": (["encoder-head", "lstm", "transformer", "minilm"], "encoder-head"),
        "strategy": (list(STRATEGIES), "fedavg"),
        "partitioning": (list(PARTITIONERS), "iid"),
        "deploy": (list(DEPLOY_POLICIES), "if-better"),
    }
    for name, (choices, default) in expected.items():
        assert props[name]["enum"] == choices, name
        assert props[name]["default"] == default, name
        assert props[name]["type"] == "string", name
    from serving.schemas import RunCreate

    # The request still takes any case and spacing, as before.
    assert RunCreate(model=" LSTM ", deploy="Never").settings()["model"] == "lstm"
