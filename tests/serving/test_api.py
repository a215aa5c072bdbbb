from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from serving.app import create_app
from serving.config import ServingConfig
from tenancy.platform import Platform
from tests.factories import TenantFixture, make_tenant, store_tiny_model

OPERATOR = "op-" + "x" * 40


@pytest.fixture
def client(platform: Platform) -> Iterator[TestClient]:
    app = create_app(
        platform, ServingConfig(operator_token=OPERATOR, max_predict_inputs=4, max_input_chars=50)
    )
    with TestClient(app) as c:
        yield c


@pytest.fixture
def acme(platform: Platform) -> TenantFixture:
    t = make_tenant(platform, "acme")
    store_tiny_model(platform, t.tenant)
    return t


@pytest.fixture
def globex(platform: Platform) -> TenantFixture:
    return make_tenant(platform, "globex")


def test_predict_with_own_key_returns_labels_and_scores(
    client: TestClient, acme: TenantFixture
) -> None:
    r = client.post(
        "/v1/models/lstm/predict",
        json={"inputs": ["great flight", "awful"], "top_k": 3},
        headers=acme.predict,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "lstm" and body["version"] == 1
    assert len(body["predictions"]) == 2
    for row in body["predictions"]:
        assert sorted(p["label"] for p in row) == ["negative", "neutral", "positive"]
        assert sum(p["score"] for p in row) == pytest.approx(1.0, abs=1e-5)
        assert row[0]["score"] >= row[1]["score"] >= row[2]["score"]


def test_predict_with_other_tenants_key_is_404(
    client: TestClient, acme: TenantFixture, globex: TenantFixture
) -> None:
    for headers in (globex.predict, globex.admin):
        r = client.post("/v1/models/lstm/predict", json={"inputs": ["hi"]}, headers=headers)
        assert r.status_code == 404
        assert "No model named 'lstm'" in r.json()["detail"]
    r = client.get("/v1/models/lstm/versions", headers=globex.admin)
    assert r.status_code == 404


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer ftk_1_2"},
    ],
)
def test_missing_or_invalid_key_is_401(
    client: TestClient, acme: TenantFixture, headers: dict[str, str]
) -> None:
    r = client.post("/v1/models/lstm/predict", json={"inputs": ["hi"]}, headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"


def test_predict_key_cannot_use_admin_routes(client: TestClient, acme: TenantFixture) -> None:
    for method, path in [
        ("get", "/v1/keys"),
        ("get", "/v1/models"),
        ("get", "/v1/privacy/budget"),
        ("get", "/v1/privacy/ledger"),
    ]:
        r = client.request(method, path, headers=acme.predict)
        assert r.status_code == 403, path
        assert "admin scope" in r.json()["detail"]


def test_input_limits_are_422_with_the_limit(client: TestClient, acme: TenantFixture) -> None:
    r = client.post("/v1/models/lstm/predict", json={"inputs": ["a"] * 5}, headers=acme.predict)
    assert r.status_code == 422 and "At most 4 inputs" in r.json()["detail"]
    r = client.post("/v1/models/lstm/predict", json={"inputs": ["x" * 51]}, headers=acme.predict)
    assert r.status_code == 422 and "the limit is 50" in r.json()["detail"]
    r = client.post("/v1/models/lstm/predict", json={"inputs": []}, headers=acme.predict)
    assert r.status_code == 422
    r = client.post("/v1/models/lstm/predict", json={"inputs": ["  "]}, headers=acme.predict)
    assert r.status_code == 422 and "inputs[0] is empty" in r.json()["detail"]


def test_undeployed_model_is_409_and_deploy_fixes_it(
    client: TestClient, platform: Platform, globex: TenantFixture
) -> None:
    store_tiny_model(platform, globex.tenant, deploy=False)
    r = client.post("/v1/models/lstm/predict", json={"inputs": ["hi"]}, headers=globex.predict)
    assert r.status_code == 409
    r = client.post("/v1/models/lstm/versions/1/deploy", headers=globex.admin)
    assert r.status_code == 200 and r.json()["deployed"] is True
    r = client.post("/v1/models/lstm/predict", json={"inputs": ["hi"]}, headers=globex.predict)
    assert r.status_code == 200
    assert client.post("/v1/models/lstm/versions/9/deploy", headers=globex.admin).status_code == 404


def test_tampered_blob_is_500_with_a_non_secret_message(
    client: TestClient, platform: Platform, globex: TenantFixture
) -> None:
    row = store_tiny_model(platform, globex.tenant)
    blob = bytearray(platform.store.get(row.blob_key))
    blob[30] ^= 1
    platform.store.put(row.blob_key, bytes(blob))
    r = client.post("/v1/models/lstm/predict", json={"inputs": ["hi"]}, headers=globex.predict)
    assert r.status_code == 500
    assert (
        r.json()["detail"]
        == "The stored model failed its integrity check; the operator has been alerted."
    )


def test_operator_creates_tenants_and_the_admin_key_works(client: TestClient) -> None:
    r = client.post("/v1/tenants", json={"name": "initech"})
    assert r.status_code == 401
    r = client.post(
        "/v1/tenants", json={"name": "initech"}, headers={"Authorization": f"Bearer {OPERATOR}"}
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["tenant"]["name"] == "initech" and body["admin_key"].startswith("ftk_")
    assert "key_hash" not in r.text
    admin = {"Authorization": f"Bearer {body['admin_key']}"}
    r = client.post(
        "/v1/tenants", json={"name": "initech"}, headers={"Authorization": f"Bearer {OPERATOR}"}
    )
    assert r.status_code == 409
    r = client.post(
        "/v1/tenants", json={"name": "Bad Name"}, headers={"Authorization": f"Bearer {OPERATOR}"}
    )
    assert r.status_code == 422 and "Invalid tenant name" in r.json()["detail"]
    # Keys: create, list without secrets, revoke with immediate effect.
    r = client.post("/v1/keys", json={"scopes": ["predict"], "name": "app"}, headers=admin)
    assert r.status_code == 201
    secret, key_id = r.json()["secret"], r.json()["key"]["id"]
    listed = client.get("/v1/keys", headers=admin)
    assert listed.status_code == 200 and secret not in listed.text and "key_hash" not in listed.text
    assert client.get("/v1/privacy/budget", headers=admin).json()["spent_epsilon"] == 0.0
    assert client.delete(f"/v1/keys/{key_id}", headers=admin).status_code == 200
    r = client.post(
        "/v1/models/lstm/predict",
        json={"inputs": ["x"]},
        headers={"Authorization": f"Bearer {secret}"},
    )
    assert r.status_code == 401
    r = client.post("/v1/keys", json={"scopes": ["root"]}, headers=admin)
    assert r.status_code == 422 and "Unknown scope 'root'" in r.json()["detail"]


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    assert client.get("/openapi.json").status_code == 200


def test_predict_for_a_tenant_without_any_model_names_the_command_that_trains_one(
    client: TestClient, acme: TenantFixture, globex: TenantFixture
) -> None:
    r = client.post(
        "/v1/models/encoder-head/predict", json={"inputs": ["hi"]}, headers=globex.predict
    )
    assert r.status_code == 404
    detail = r.json()["detail"]
    assert "Tenant 'globex' has no model yet" in detail
    assert "fedtext simulate --tenant globex" in detail
    # A tenant with models hears only that this name is not one of them.
    r = client.post("/v1/models/nosuch/predict", json={"inputs": ["hi"]}, headers=acme.predict)
    assert r.status_code == 404 and r.json()["detail"] == "No model named 'nosuch'."


def test_a_mostly_unreadable_input_carries_a_warning_with_its_unknown_tokens(
    client: TestClient, acme: TenantFixture
) -> None:
    inputs = ["my flight was delayed again", "😀😀😀", "我的航班又晚点了", "café délicieux"]
    r = client.post("/v1/models/lstm/predict", json={"inputs": inputs}, headers=acme.predict)
    assert r.status_code == 200, r.text
    warnings = r.json()["warnings"]
    assert [w["input"] for w in warnings] == [1, 2]
    assert warnings[0]["unknown_tokens"] == warnings[0]["tokens"] == 1
    assert warnings[1]["unknown_tokens"] == 6 and warnings[1]["tokens"] == 8
    assert "multilingual encoder" in warnings[1]["message"]
    # Readable inputs: the body is as before, without the field.
    plain = client.post(
        "/v1/models/lstm/predict", json={"inputs": inputs[:1]}, headers=acme.predict
    )
    assert "warnings" not in plain.json()
