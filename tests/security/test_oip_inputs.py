"""Malformed Open Inference Protocol requests are 400s with the protocol's error object.

In process (no server subprocess): each body below made the REST adapter raise past its
refusal handling (a 500) before the review fix.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from serving.app import create_app
from serving.config import ServingConfig
from tenancy.platform import Platform
from tests.factories import make_tenant, store_tiny_model

INFER = "/v2/models/lstm/infer"
TENSOR = '{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hello there"]'


@pytest.mark.parametrize(
    ("body", "message"),
    [
        # parameters that are not objects: of the input, of the request, of an output
        ('{"inputs": [' + TENSOR + ', "parameters": 5}]}', "should be a JSON object"),
        ('{"inputs": [' + TENSOR + '}], "parameters": [1]}', "should be a JSON object"),
        ('{"inputs": [' + TENSOR + '}], "parameters": "x"}', "should be a JSON object"),
        (
            '{"inputs": [' + TENSOR + '}], "outputs": [{"name": "label", "parameters": [1]}]}',
            "should be a JSON object",
        ),
        # an integer past Python's 4300-digit parsing limit
        ('{"inputs": [' + TENSOR + '}], "id": ' + "9" * 5000 + "}", "not valid JSON"),
        # nesting deeper than Python's parser recurses
        ("[" * 100_000, "nested too deeply"),
        ('{"inputs": [' + TENSOR.replace('["hello there"]', "[" * 50_000) + "}]}", "nested"),
        # true is not a dimension
        ('{"inputs": [' + TENSOR.replace("[1]", "[true]") + "}]}", "list of integers"),
    ],
)
def test_malformed_inference_requests_are_400_not_500(
    sqlite_platform: Platform, body: str, message: str
) -> None:
    acme = make_tenant(sqlite_platform, "acme")
    store_tiny_model(sqlite_platform, acme.tenant)
    app = create_app(sqlite_platform, ServingConfig(operator_token="op-" + "o" * 40))
    with TestClient(app, raise_server_exceptions=False) as client:
        assert (
            client.post(
                INFER, content="{" + '"inputs": [' + TENSOR + "}]}", headers=acme.predict
            ).status_code
            == 200
        )
        r = client.post(INFER, content=body, headers=acme.predict)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"], r.text


def test_a_body_over_the_limit_is_413_in_the_protocols_error_object(
    sqlite_platform: Platform,
) -> None:
    acme = make_tenant(sqlite_platform, "acme")
    store_tiny_model(sqlite_platform, acme.tenant)
    app = create_app(sqlite_platform, ServingConfig(operator_token="op-" + "o" * 40))

    def chunks():  # type: ignore[no-untyped-def]
        yield b'{"inputs": [' + TENSOR.encode() + b'}], "id": "'
        for _ in range(20):
            yield b"x" * 65536
        yield b'"}'

    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.post(INFER, content=chunks(), headers=acme.predict)
    assert r.status_code == 413, r.text
    assert "exceeds the limit" in r.json()["error"], r.text
