"""An encoder-head model served from the encrypted registry, and refused on another encoder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from models import ModelSpec, build_model, save_weights, text_inputs
from serving.app import create_app
from serving.config import ServingConfig
from tenancy.db import session_scope
from tenancy.platform import Platform
from tenancy.registry import store_model_version
from tests.factories import TenantFixture, make_tenant
from tests.models.test_encoder_head import tiny_bert_dir

LABELS = ["negative", "neutral", "positive"]
TEXTS = ["thanks for the upgrade, lovely crew", "lost my bag again", "gate 12 at noon"]


def store(platform: Platform, tenant: TenantFixture, spec: ModelSpec) -> torch.nn.Module:
    torch.manual_seed(3)
    model = build_model(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    with session_scope(platform.engine) as session:
        store_model_version(
            session=session, keyring=platform.keyring, store=platform.store,
            tenant=tenant.tenant, name="sentiment", spec_json=spec.to_json(),
            weights=save_weights(model), deploy=True,
        )  # fmt: skip
    return model.eval()


def test_an_encoder_head_model_predicts_from_its_encrypted_head(platform: Platform) -> None:
    acme = make_tenant(platform, "acme")
    spec = ModelSpec.create("encoder-head", LABELS)
    model = store(platform, acme, spec)
    root: Path = platform.store.root  # type: ignore[attr-defined]
    blobs = [p for p in root.rglob("*") if p.is_file()]
    assert len(blobs) == 1 and blobs[0].stat().st_size < 10_000  # the head only, encrypted
    with torch.no_grad():
        expected = torch.softmax(model(*text_inputs(spec, TEXTS)), -1)
    with TestClient(create_app(platform, ServingConfig())) as client:
        r = client.post(
            "/v1/models/sentiment/predict", json={"inputs": TEXTS, "top_k": 3}, headers=acme.predict
        )
    assert r.status_code == 200, r.text
    for row, probs in zip(r.json()["predictions"], expected, strict=True):
        got = {p["label"]: p["score"] for p in row}
        assert [got[label] for label in LABELS] == pytest.approx(probs.tolist(), abs=1e-5)


def test_a_server_whose_encoder_files_differ_refuses_the_model_clearly(
    platform: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    acme = make_tenant(platform, "acme")
    path = tiny_bert_dir(tmp_path / "enc", seed=0)
    monkeypatch.setenv("FEDTEXT_ENCODERS", f"house={path}")
    store(platform, acme, ModelSpec.create("encoder-head", LABELS, encoder="house"))
    shutil.rmtree(path)
    tiny_bert_dir(path, seed=1)  # the operator put other weights behind the same name
    with TestClient(create_app(platform, ServingConfig())) as client:
        r = client.post(
            "/v1/models/sentiment/predict", json={"inputs": TEXTS}, headers=acme.predict
        )
    assert r.status_code == 500
    assert "not the one the model was trained with" in r.json()["detail"]
