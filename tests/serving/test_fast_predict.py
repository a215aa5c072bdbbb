"""The warm predict path (serving/runtime/lookups.py memo + serving/protocols/v1/fastlane.py)
against the database.

Each case runs on SQLite and PostgreSQL. The memo must never answer for a key, tenant or
deployment that changed through the API, and must catch up within about its ttl with
changes made by another process (written straight to the database here, as the CLI does).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from serving.app import create_app
from serving.config import ServingConfig
from tenancy.platform import Platform
from tenancy.registry import deploy_version
from tenancy.rotation import delete_tenant
from tenancy.tables import ApiKey, utcnow
from tenancy.tenants import create_api_key, hash_key
from tests.factories import TenantFixture, make_tenant, store_tiny_model

OPERATOR = "op-" + "x" * 40
TTL = 0.2
PREDICT = "/v1/models/lstm/predict"
BODY = {"inputs": ["great flight", "awful delay", "it is tuesday"], "top_k": 2}


def _client(platform: Platform, ttl: float) -> TestClient:
    config = ServingConfig(
        operator_token=OPERATOR, max_predict_inputs=4, max_input_chars=50, lookup_ttl_s=ttl
    )
    return TestClient(create_app(platform, config))


@pytest.fixture
def acme(platform: Platform) -> TenantFixture:
    t = make_tenant(platform, "acme")
    store_tiny_model(platform, t.tenant, seed=0)
    store_tiny_model(platform, t.tenant, deploy=False, seed=1)
    return t


@pytest.fixture
def client(platform: Platform, acme: TenantFixture) -> Iterator[TestClient]:
    with _client(platform, TTL) as c:
        assert c.post(PREDICT, json=BODY, headers=acme.predict).status_code == 200  # warm
        yield c


def _eventually(check, seconds: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "the memo did not catch up"
        time.sleep(0.05)


def test_warm_answers_equal_the_database_path(
    platform: Platform, acme: TenantFixture, client: TestClient
) -> None:
    warm = client.post(PREDICT, json=BODY, headers=acme.predict)
    with _client(platform, 0) as cold_client:  # ttl 0: every request asks the database
        cold = cold_client.post(PREDICT, json=BODY, headers=acme.predict)
    assert warm.status_code == cold.status_code == 200
    assert warm.json() == cold.json()
    assert warm.headers["content-type"] == cold.headers["content-type"] == "application/json"
    # The warm request is counted under the route's template like any other (the fixture's
    # first request and this one).
    metrics = client.get("/metrics", headers={"Authorization": f"Bearer {OPERATOR}"}).text
    assert (
        'fedtext_http_requests_total{method="POST",route="/v1/models/{name}/predict",'
        'status="200"} 2.0'
    ) in metrics


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": []},
        {"inputs": ["a"] * 5},
        {"inputs": ["x" * 51]},
        {"inputs": ["   "]},
        {"inputs": ["fine"], "top_k": 0},
        {"inputs": "not a list"},
        {"top_k": 1},
    ],
)
def test_warm_refusals_equal_the_database_path(
    platform: Platform, acme: TenantFixture, client: TestClient, body: dict
) -> None:
    warm = client.post(PREDICT, json=body, headers=acme.predict)
    with _client(platform, 0) as cold_client:
        cold = cold_client.post(PREDICT, json=body, headers=acme.predict)
    assert warm.status_code == cold.status_code == 422
    assert warm.json() == cold.json()


def test_warm_path_keeps_malformed_and_non_json_bodies_to_fastapi(
    acme: TenantFixture, client: TestClient
) -> None:
    r = client.post(
        PREDICT, content=b"{not json", headers={**acme.predict, "content-type": "application/json"}
    )
    assert r.status_code == 422
    assert r.json()["detail"][0]["type"] == "json_invalid"


def test_revoke_through_the_api_holds_from_the_next_request(
    platform: Platform, acme: TenantFixture, client: TestClient
) -> None:
    keys = client.get("/v1/keys", headers=acme.admin).json()
    predict_id = next(k["id"] for k in keys if k["scopes"] == ["predict"])
    assert client.delete(f"/v1/keys/{predict_id}", headers=acme.admin).status_code == 200
    assert client.post(PREDICT, json=BODY, headers=acme.predict).status_code == 401


def test_deploy_and_rollback_through_the_api_hold_from_the_next_request(
    acme: TenantFixture, client: TestClient
) -> None:
    r = client.post("/v1/models/lstm/versions/2/deploy", headers=acme.admin)
    assert r.status_code == 200
    assert client.post(PREDICT, json=BODY, headers=acme.predict).json()["version"] == 2
    assert client.post("/v1/models/lstm/rollback", headers=acme.admin).status_code == 200
    assert client.post(PREDICT, json=BODY, headers=acme.predict).json()["version"] == 1


def test_tenant_deleted_through_the_api_loses_its_warm_path(
    acme: TenantFixture, client: TestClient
) -> None:
    operator = {"Authorization": f"Bearer {OPERATOR}"}
    assert client.delete(f"/v1/tenants/{acme.tenant.id}", headers=operator).status_code == 200
    assert client.post(PREDICT, json=BODY, headers=acme.predict).status_code == 401


def test_another_process_revoking_a_key_is_seen_within_the_ttl(
    platform: Platform, acme: TenantFixture, client: TestClient
) -> None:
    with Session(platform.engine) as session:
        key = next(
            k for k in session.query(ApiKey).all() if k.key_hash == hash_key(acme.predict_key)
        )
        key.revoked_at = utcnow()
        session.add(key)
        session.commit()
    _eventually(lambda: client.post(PREDICT, json=BODY, headers=acme.predict).status_code == 401)


def test_another_process_deleting_the_tenant_is_seen_within_the_ttl(
    platform: Platform, acme: TenantFixture, client: TestClient
) -> None:
    delete_tenant(platform.engine, platform.keyring, platform.store, tenant_id=acme.tenant.id)
    _eventually(lambda: client.post(PREDICT, json=BODY, headers=acme.predict).status_code == 401)


def test_another_process_deploying_is_seen_within_the_ttl(
    platform: Platform, acme: TenantFixture, client: TestClient
) -> None:
    with Session(platform.engine) as session:
        deploy_version(session=session, tenant_id=acme.tenant.id, name="lstm", version=2)
        session.commit()
    _eventually(
        lambda: client.post(PREDICT, json=BODY, headers=acme.predict).json().get("version") == 2
    )


def test_a_memoized_key_stops_at_its_own_expiry(platform: Platform, acme: TenantFixture) -> None:
    with _client(platform, 3600) as client:  # the memo alone would keep it for an hour
        # The model is loaded first (slow on a loaded machine), so that the key's short
        # life is spent on memoized answers only.
        assert client.post(PREDICT, json=BODY, headers=acme.predict).status_code == 200
        expires = utcnow() + timedelta(seconds=3)
        with Session(platform.engine, expire_on_commit=False) as session:
            _, secret = create_api_key(
                session=session, tenant=acme.tenant, scopes="predict", expires_at=expires
            )
            session.commit()
        headers = {"Authorization": f"Bearer {secret}"}
        assert client.post(PREDICT, json=BODY, headers=headers).status_code == 200
        assert client.post(PREDICT, json=BODY, headers=headers).status_code == 200
        time.sleep(max(0.0, (expires - utcnow()).total_seconds()) + 0.2)
        assert client.post(PREDICT, json=BODY, headers=headers).status_code == 401


def test_warm_predictions_need_no_database(platform: Platform, acme: TenantFixture) -> None:
    with _client(platform, 3600) as client:
        assert client.post(PREDICT, json=BODY, headers=acme.predict).status_code == 200
        client.app.state.platform = None  # type: ignore[attr-defined]  # any DB access fails now
        client.app.state.predict.platform = None  # type: ignore[attr-defined]
        r = client.post(PREDICT, json=BODY, headers=acme.predict)
        assert r.status_code == 200, r.text
        assert len(r.json()["predictions"]) == 3
