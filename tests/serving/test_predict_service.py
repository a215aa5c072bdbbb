"""The one predict service (serving/predict.py) behind its two adapters.

- Writes made through tenancy's functions (not through a route) reach a warm memo at
  once: the memo's ttl is an hour here, so only the change notification can explain it.
- The fast lane (ASGI) and the FastAPI route answer the same request the same way: a
  client whose memo is warm (the fast lane takes what it can) against one with the memo
  off (ttl 0: the route answers everything).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from serving.app import create_app
from serving.config import ServingConfig
from serving.predict import bearer_credential
from tenancy.db import session_scope
from tenancy.platform import Platform
from tenancy.registry import deploy_version, set_quantize
from tenancy.rotation import delete_tenant, rotate_dek
from tenancy.tables import ApiKey
from tenancy.tenants import hash_key, revoke_api_key
from tests.factories import TenantFixture, make_tenant, store_tiny_model

PREDICT = "/v1/models/lstm/predict"
BODY = {"inputs": ["great flight", "awful delay"], "top_k": 2}
HOUR = 3600.0


def _client(platform: Platform, ttl: float) -> TestClient:
    config = ServingConfig(max_predict_inputs=4, max_input_chars=50, lookup_ttl_s=ttl)
    return TestClient(create_app(platform, config))


@pytest.fixture
def acme(platform: Platform) -> TenantFixture:
    t = make_tenant(platform, "acme")
    store_tiny_model(platform, t.tenant, seed=0)
    store_tiny_model(platform, t.tenant, deploy=False, seed=1)
    store_tiny_model(platform, t.tenant, name="draft", deploy=False)
    return t


@pytest.fixture
def globex(platform: Platform) -> TenantFixture:
    t = make_tenant(platform, "globex")
    store_tiny_model(platform, t.tenant, name="other")
    return t


@pytest.fixture
def warm(platform: Platform, acme: TenantFixture, globex: TenantFixture) -> Iterator[TestClient]:
    """A client whose memo knows acme's and globex's predict keys and deployed models."""
    with _client(platform, HOUR) as c:
        assert c.post(PREDICT, json=BODY, headers=acme.predict).status_code == 200
        r = c.post("/v1/models/other/predict", json=BODY, headers=globex.predict)
        assert r.status_code == 200
        assert c.app.state.predict.warm(acme.predict_key, "lstm") is not None  # type: ignore[attr-defined]
        yield c


def _key_id(platform: Platform, secret: str) -> str:
    with Session(platform.engine) as session:
        return session.exec(select(ApiKey.id).where(ApiKey.key_hash == hash_key(secret))).one()


# ------------------------------------------------------------ tenancy writes, memo warm


def test_a_key_revoked_through_tenancy_is_refused_by_the_next_prediction(
    platform: Platform, acme: TenantFixture, warm: TestClient
) -> None:
    key_id = _key_id(platform, acme.predict_key)
    with session_scope(platform.engine) as session:
        revoke_api_key(session=session, tenant_id=acme.tenant.id, key_id=key_id)
    r = warm.post(PREDICT, json=BODY, headers=acme.predict)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"


def test_a_revocation_not_yet_committed_changes_nothing(
    platform: Platform, acme: TenantFixture, warm: TestClient
) -> None:
    key_id = _key_id(platform, acme.predict_key)
    with Session(platform.engine) as session:
        revoke_api_key(session=session, tenant_id=acme.tenant.id, key_id=key_id)
        assert warm.post(PREDICT, json=BODY, headers=acme.predict).status_code == 200
        session.rollback()
    assert warm.post(PREDICT, json=BODY, headers=acme.predict).status_code == 200


def test_a_tenant_deleted_through_tenancy_is_refused_and_its_models_leave_memory(
    platform: Platform, acme: TenantFixture, globex: TenantFixture, warm: TestClient
) -> None:
    cache = warm.app.state.cache  # type: ignore[attr-defined]
    assert any(key[0] == acme.tenant.id for key in cache.cached_keys())
    delete_tenant(platform.engine, platform.keyring, platform.store, tenant_id=acme.tenant.id)
    assert warm.post(PREDICT, json=BODY, headers=acme.predict).status_code == 401
    assert [key[0] for key in cache.cached_keys()] == [globex.tenant.id]
    r = warm.post("/v1/models/other/predict", json=BODY, headers=globex.predict)
    assert r.status_code == 200


def test_a_version_deployed_through_tenancy_answers_the_next_prediction(
    platform: Platform, acme: TenantFixture, warm: TestClient
) -> None:
    with session_scope(platform.engine) as session:
        deploy_version(session=session, tenant_id=acme.tenant.id, name="lstm", version=2)
    assert warm.post(PREDICT, json=BODY, headers=acme.predict).json()["version"] == 2
    with session_scope(platform.engine) as session:
        deploy_version(session=session, tenant_id=acme.tenant.id, name="lstm", version=1)
    assert warm.post(PREDICT, json=BODY, headers=acme.predict).json()["version"] == 1


def test_serving_options_set_through_tenancy_hold_from_the_next_prediction(
    platform: Platform, acme: TenantFixture, warm: TestClient
) -> None:
    with session_scope(platform.engine) as session:
        set_quantize(
            session=session,
            tenant_id=acme.tenant.id,
            name="lstm",
            version=1,
            quantize="dynamic-int8",
        )
    assert warm.post(PREDICT, json=BODY, headers=acme.predict).status_code == 200
    target = warm.app.state.predict.warm(acme.predict_key, "lstm")  # type: ignore[attr-defined]
    assert target is not None and target.served.quantize == "dynamic-int8"


def test_a_data_key_rotated_through_tenancy_keeps_predictions_answered(
    platform: Platform, acme: TenantFixture, warm: TestClient
) -> None:
    before = warm.post(PREDICT, json=BODY, headers=acme.predict).json()
    rotate_dek(platform.engine, platform.keyring, platform.store, tenant="acme")
    assert warm.post(PREDICT, json=BODY, headers=acme.predict).json() == before


# ------------------------------------------------------------ two adapters, one answer

Case = tuple[str, str | None, str, object, int]  # name, who, path, body, status

ANSWERED_WARM: list[Case] = [  # the fast lane answers these itself, from memory
    ("ok", "acme", PREDICT, BODY, 200),
    ("blank input", "acme", PREDICT, {"inputs": ["   "]}, 422),
    ("too many inputs", "acme", PREDICT, {"inputs": ["a"] * 5}, 422),
    ("input too long", "acme", PREDICT, {"inputs": ["x" * 51]}, 422),
]
FORWARDED: list[
    Case
] = [  # the fast lane hands these to the route (they need the database or FastAPI)
    ("missing key", None, PREDICT, BODY, 401),
    ("not a bearer", "basic", PREDICT, BODY, 401),
    ("unknown key", "forged", PREDICT, BODY, 401),
    ("other tenant's model", "globex", PREDICT, BODY, 404),
    ("undeployed model", "acme", "/v1/models/draft/predict", BODY, 409),
    ("empty inputs", "acme", PREDICT, {"inputs": []}, 422),
    ("top_k zero", "acme", PREDICT, {"inputs": ["fine"], "top_k": 0}, 422),
    ("inputs missing", "acme", PREDICT, {"top_k": 1}, 422),
    ("malformed json", "acme", PREDICT, b"{not json", 422),
]


def _headers(who: str | None, acme: TenantFixture, globex: TenantFixture) -> dict[str, str]:
    headers = {"content-type": "application/json"}
    if who == "acme":
        headers.update(acme.predict)
    elif who == "globex":
        headers.update(globex.predict)
    elif who == "basic":
        headers["Authorization"] = "Basic " + acme.predict_key
    elif who == "forged":
        headers["Authorization"] = "Bearer ftk_000000000000_forged"
    return headers


def _send(client: TestClient, path: str, body: object, headers: dict[str, str]):  # type: ignore[no-untyped-def]
    if isinstance(body, bytes):
        return client.post(path, content=body, headers=headers)
    return client.post(path, json=body, headers=headers)


def _same(warm: object, cold: object, status: int) -> None:
    for r in (warm, cold):
        assert r.status_code == status, r.text  # type: ignore[attr-defined]
    assert warm.json() == cold.json()  # type: ignore[attr-defined]
    for name in ("content-type", "www-authenticate"):
        assert warm.headers.get(name) == cold.headers.get(name)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("case", "who", "path", "body", "status"), ANSWERED_WARM + FORWARDED)
def test_the_fast_lane_and_the_route_answer_alike(
    platform: Platform,
    acme: TenantFixture,
    globex: TenantFixture,
    warm: TestClient,
    case: str,
    who: str | None,
    path: str,
    body: object,
    status: int,
) -> None:
    headers = _headers(who, acme, globex)
    warm_answer = _send(warm, path, body, headers)
    with _client(platform, 0) as cold:  # no memo: the fast lane never answers
        cold_answer = _send(cold, path, body, headers)
    _same(warm_answer, cold_answer, status)


@pytest.mark.parametrize(("case", "who", "path", "body", "status"), ANSWERED_WARM)
def test_the_fast_lane_answers_warm_requests_without_the_database(
    platform: Platform,
    acme: TenantFixture,
    globex: TenantFixture,
    warm: TestClient,
    case: str,
    who: str | None,
    path: str,
    body: object,
    status: int,
) -> None:
    headers = _headers(who, acme, globex)
    with _client(platform, 0) as cold:
        cold_answer = _send(cold, path, body, headers)
    warm.app.state.platform = None  # type: ignore[attr-defined]  # any DB access fails now
    warm.app.state.predict.platform = None  # type: ignore[attr-defined]
    _same(_send(warm, path, body, headers), cold_answer, status)


def test_a_predict_key_on_an_admin_route_is_403_with_the_scope_named(
    acme: TenantFixture, warm: TestClient
) -> None:
    r = warm.get("/v1/models", headers=acme.predict)
    assert r.status_code == 403
    assert r.json() == {"detail": "This key lacks the admin scope."}


@pytest.mark.parametrize(
    ("header", "credential"),
    [
        (None, None),
        ("", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("Basic abc", None),
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),
        ("Bearer  abc ", "abc"),
    ],
)
def test_one_parser_reads_the_bearer_credential(header: str | None, credential: str | None) -> None:
    assert bearer_credential(header) == credential
