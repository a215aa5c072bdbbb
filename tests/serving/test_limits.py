"""Request limits over HTTP: body size 413, input limits 422, per-key rate limit 429."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from serving.app import create_app
from serving.config import ServingConfig
from serving.limits import Limits, TokenBuckets
from tenancy.platform import Platform
from tests.factories import make_tenant, store_tiny_model


def _client(platform: Platform, limits: Limits) -> TestClient:
    return TestClient(
        create_app(platform, ServingConfig(max_predict_inputs=3, max_input_chars=20), limits=limits)
    )


def test_oversized_body_is_413(sqlite_platform: Platform) -> None:
    acme = make_tenant(sqlite_platform, "acme")
    store_tiny_model(sqlite_platform, acme.tenant)
    with _client(sqlite_platform, Limits(max_body_bytes=200)) as c:
        big = {"inputs": ["x" * 300]}
        r = c.post("/v1/models/lstm/predict", json=big, headers=acme.predict)
        assert r.status_code == 413 and "200 bytes" in r.json()["detail"]

        def chunks():  # no Content-Length: the streamed body is counted
            yield b'{"inputs": ["'
            yield b"y" * 400
            yield b'"]}'

        r = c.post(
            "/v1/models/lstm/predict",
            content=chunks(),
            headers={**acme.predict, "content-type": "application/json"},
        )
        assert r.status_code == 413
        r = c.post("/v1/models/lstm/predict", json={"inputs": ["ok"]}, headers=acme.predict)
        assert r.status_code == 200


def test_input_count_and_length_are_422_naming_the_limit(sqlite_platform: Platform) -> None:
    acme = make_tenant(sqlite_platform, "acme")
    store_tiny_model(sqlite_platform, acme.tenant)
    with _client(sqlite_platform, Limits()) as c:
        r = c.post("/v1/models/lstm/predict", json={"inputs": ["a"] * 4}, headers=acme.predict)
        assert r.status_code == 422 and "At most 3 inputs" in r.json()["detail"]
        r = c.post("/v1/models/lstm/predict", json={"inputs": ["a" * 21]}, headers=acme.predict)
        assert r.status_code == 422 and "the limit is 20" in r.json()["detail"]


def test_rate_limit_is_per_key_with_retry_after(sqlite_platform: Platform) -> None:
    acme, globex = make_tenant(sqlite_platform, "acme"), make_tenant(sqlite_platform, "globex")
    with _client(sqlite_platform, Limits(rate_per_second=0.5, burst=3)) as c:
        codes = [c.get("/v1/keys", headers=acme.admin).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        r = c.get("/v1/keys", headers=acme.admin)
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) >= 1 and "per key" in r.json()["detail"]
        # Another key, and a forged key borrowing acme's prefix, have buckets of their own.
        assert c.get("/v1/keys", headers=globex.admin).status_code == 200
        forged = {"Authorization": acme.admin["Authorization"][:-3] + "zzz"}
        assert c.get("/v1/keys", headers=forged).status_code == 401
        assert c.get("/healthz").status_code == 200


def test_token_bucket_refills_at_its_rate() -> None:
    b = TokenBuckets(rate=2.0, burst=2, max_buckets=2)
    assert [b.take("k", now=0.0) for _ in range(3)] == [0.0, 0.0, pytest.approx(0.5)]
    assert b.take("k", now=0.5) == 0.0
    b.take("a", now=0.0)
    b.take("b", now=0.0)
    assert len(b._buckets) == 2  # bounded


def test_failed_authentication_is_limited_per_address_in_process(
    sqlite_platform: Platform,
) -> None:
    acme = make_tenant(sqlite_platform, "acme")
    limits = Limits(failed_auth_per_second=0.1, failed_auth_burst=2)
    with _client(sqlite_platform, limits) as c:
        assert c.get("/v1/keys", headers=acme.admin).status_code == 200
        forged = [{"Authorization": f"Bearer ftk_forged{i}"} for i in range(4)]
        codes = [c.get("/v1/keys", headers=h).status_code for h in forged]
        assert codes == [401, 401, 429, 429]
        # /healthz answering a forged token does not make it a known key.
        assert c.get("/healthz", headers=forged[0]).status_code == 429
        # The key that authenticated before is not blocked with its address.
        assert c.get("/v1/keys", headers=acme.admin).status_code == 200


def test_repeated_authorization_headers_are_400_in_process(sqlite_platform: Platform) -> None:
    acme = make_tenant(sqlite_platform, "acme")
    twice = [("authorization", acme.admin["Authorization"]), ("authorization", "Bearer x")]
    with _client(sqlite_platform, Limits()) as c:
        for path in ("/healthz", "/v1/keys", "/metrics"):
            r = c.get(path, headers=twice)
            assert r.status_code == 400 and "one Authorization header" in r.json()["detail"]


@pytest.mark.parametrize("value", ["off", "", "None"])
def test_a_rate_limit_is_turned_off_from_the_environment(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedtext.settings import Settings

    monkeypatch.setenv("FEDTEXT_RATE_LIMIT_PER_SECOND", value)
    monkeypatch.setenv("FEDTEXT_FAILED_AUTH_PER_SECOND", value)
    settings = Settings()
    assert settings.rate_limit_per_second is None and settings.failed_auth_per_second is None
    monkeypatch.setenv("FEDTEXT_RATE_LIMIT_PER_SECOND", "5")
    assert Settings().rate_limit_per_second == 5.0
