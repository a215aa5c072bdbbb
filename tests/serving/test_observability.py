"""/metrics, JSON logs with request ids, and no request text in any log line."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from serving.app import create_app
from serving.config import ServingConfig
from serving.logs import JsonFormatter
from tenancy.platform import Platform
from tests.factories import TenantFixture, make_tenant, store_tiny_model

SECRET = "zebra quartz confidential diagnosis of patient 4711"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Everything any logger writes, at every level, formatted as the server writes it."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield stream
    root.removeHandler(handler)
    root.setLevel(old_level)


@pytest.fixture
def acme(platform: Platform) -> TenantFixture:
    t = make_tenant(platform, "acme")
    store_tiny_model(platform, t.tenant)
    return t


def test_metrics_parse_as_prometheus_text(platform: Platform, acme: TenantFixture) -> None:
    operator = "op-" + "m" * 40
    with TestClient(create_app(platform, ServingConfig(operator_token=operator))) as client:
        for _ in range(3):
            r = client.post(
                "/v1/models/lstm/predict", json={"inputs": ["hi"]}, headers=acme.predict
            )
            assert r.status_code == 200
        # The operator's: request counts and cache sizes describe every tenant's traffic.
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers=acme.admin).status_code == 401
        r = client.get("/metrics", headers={"Authorization": f"Bearer {operator}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }
    route = ("route", "/v1/models/{name}/predict")
    key = ("fedtext_http_requests_total", (("method", "POST"), route, ("status", "200")))
    assert samples[key] == 3
    count = ("fedtext_http_request_duration_seconds_count", (("method", "POST"), route))
    assert samples[count] == 3
    assert samples[("fedtext_model_cache_misses_total", ())] == 1
    assert samples[("fedtext_model_cache_hits_total", ())] == 2
    assert samples[("fedtext_batch_size_sum", ())] == 3
    batches = samples[("fedtext_batch_size_count", ())]
    assert samples[("fedtext_inference_duration_seconds_count", ())] == batches >= 1
    assert samples[("fedtext_inference_duration_seconds_sum", ())] > 0
    load = ("fedtext_model_load_duration_seconds_count", (("family", "lstm"), ("quantize", "None")))
    assert samples[load] == 1
    # No tenant id or model name leaks into labels.
    assert acme.tenant.id not in r.text


def test_logs_are_json_with_request_id_and_never_request_text(
    platform: Platform, acme: TenantFixture, captured: io.StringIO
) -> None:
    config = ServingConfig(max_input_chars=60)
    with TestClient(create_app(platform, config)) as client:
        ok = client.post("/v1/models/lstm/predict", json={"inputs": [SECRET]}, headers=acme.predict)
        assert ok.status_code == 200
        too_long = client.post(
            "/v1/models/lstm/predict", json={"inputs": [SECRET * 3]}, headers=acme.predict
        )
        assert too_long.status_code == 422
        own_id = client.post(
            "/v1/models/lstm/predict",
            json={"inputs": [SECRET]},
            headers={**acme.predict, "X-Request-ID": "trace-abc.123"},
        )
        assert own_id.headers["x-request-id"] == "trace-abc.123"
        bad_id = client.get("/healthz", headers={"X-Request-ID": "has spaces and text"})
        assert bad_id.headers["x-request-id"] != "has spaces and text"
    text = captured.getvalue()
    assert "zebra" not in text and "4711" not in text and "has spaces" not in text
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    access = [e for e in lines if e["logger"] == "fedtext.serving.access"]
    assert {e["request_id"] for e in access} >= {ok.headers["x-request-id"], "trace-abc.123"}
    assert {(e["route"], e["status"]) for e in access} >= {
        ("/v1/models/{name}/predict", 200),
        ("/v1/models/{name}/predict", 422),
    }


def test_integrity_failure_is_500_and_logged_without_secrets(
    platform: Platform, acme: TenantFixture, captured: io.StringIO
) -> None:
    t = make_tenant(platform, "globex")
    row = store_tiny_model(platform, t.tenant)
    blob = bytearray(platform.store.get(row.blob_key))
    blob[40] ^= 1
    platform.store.put(row.blob_key, bytes(blob))
    with TestClient(create_app(platform, ServingConfig())) as client:
        r = client.post("/v1/models/lstm/predict", json={"inputs": [SECRET]}, headers=t.predict)
    assert r.status_code == 500
    assert "integrity check" in r.json()["detail"]
    errors = [
        json.loads(line) for line in captured.getvalue().splitlines() if '"level": "ERROR"' in line
    ]
    assert len(errors) == 1
    assert errors[0]["reason"] == "integrity" and errors[0]["tenant"] == t.tenant.id
    assert errors[0]["request_id"] == r.headers["x-request-id"]
    assert "zebra" not in captured.getvalue()
