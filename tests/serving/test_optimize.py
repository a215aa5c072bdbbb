"""Serving-time rewrites: the fused LSTM keeps the answers; int8 is an admin's choice."""

from __future__ import annotations

import copy

import pytest
import torch
from fastapi.testclient import TestClient
from opacus.layers import DPLSTM
from sqlmodel import Session
from torch import nn

from models import ModelSpec, build_model, load_tokenizer
from serving.app import create_app
from serving.config import ServingConfig
from serving.runtime.optimize import check_quantize, prepare_for_inference
from tenancy.platform import Platform
from tests.factories import make_tenant, store_tiny_model


def test_fused_lstm_gives_the_trained_models_outputs() -> None:
    torch.manual_seed(3)
    spec = ModelSpec.create("lstm", ["a", "b", "c"], proj_dim=16, hidden_dim=12)
    trained = build_model(spec).eval()
    served = prepare_for_inference(copy.deepcopy(trained))
    assert not any(isinstance(m, DPLSTM) for m in served.modules())
    assert any(isinstance(m, nn.LSTM) for m in served.modules())
    enc = load_tokenizer().encode(["a short one", "a somewhat longer sentence here"], 24)
    with torch.no_grad():
        expected = trained(enc.input_ids, enc.attention_mask)
        got = served(enc.input_ids, enc.attention_mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_unknown_quantization_is_refused() -> None:
    assert check_quantize(None) is None and check_quantize("dynamic-int8") == "dynamic-int8"
    with pytest.raises(ValueError, match="Unknown quantization 'int4'"):
        check_quantize("int4")


def test_admin_sets_int8_and_the_next_request_serves_it(platform: Platform) -> None:
    acme = make_tenant(platform, "acme")
    store_tiny_model(platform, acme.tenant)
    app = create_app(platform, ServingConfig())
    path = "/v1/models/lstm/versions/1/serving"
    with TestClient(app) as client:
        before = client.post(
            "/v1/models/lstm/predict",
            json={"inputs": ["good trip"], "top_k": 3},
            headers=acme.predict,
        )
        assert client.get(path, headers=acme.admin).json()["quantize"] is None
        assert (
            client.put(path, json={"quantize": "dynamic-int8"}, headers=acme.predict).status_code
            == 403
        )
        r = client.put(path, json={"quantize": "int4"}, headers=acme.admin)
        assert r.status_code == 422
        r = client.put(path, json={"quantize": "dynamic-int8"}, headers=acme.admin)
        assert r.status_code == 200 and r.json()["quantize"] == "dynamic-int8"
        after = client.post(
            "/v1/models/lstm/predict",
            json={"inputs": ["good trip"], "top_k": 3},
            headers=acme.predict,
        )
        assert (
            client.get("/v1/models/lstm/versions/2/serving", headers=acme.admin).status_code == 404
        )
    assert before.status_code == after.status_code == 200
    with Session(platform.engine) as session:
        served, _ = app.state.cache.get_deployed(session, acme.tenant.id, "lstm")
    assert served.quantize == "dynamic-int8"
    assert any(".quantized." in type(m).__module__ for m in served.model.modules())
    b = {p["label"]: p["score"] for p in before.json()["predictions"][0]}
    a = {p["label"]: p["score"] for p in after.json()["predictions"][0]}
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 0.05 for k in a)
