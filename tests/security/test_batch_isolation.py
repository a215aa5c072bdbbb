"""One client's bad input fails only its own request, never the batch it shares (finding 2)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedtext.server_thread import BackgroundServer
from serving.app import create_app
from serving.batching import MicroBatcher, Rows
from serving.config import ServingConfig
from tenancy.platform import Platform
from tests.factories import make_tenant, store_tiny_model

PREDICT = "/v1/models/lstm/predict"
OPERATOR = "op-" + "i" * 40


@pytest.mark.slow
def test_a_lone_surrogate_in_a_shared_batch_fails_alone(sqlite_platform: Platform) -> None:
    acme = make_tenant(sqlite_platform, "acme")
    store_tiny_model(sqlite_platform, acme.tenant)
    # A long wait makes sharing certain: every request below lands in one forward pass.
    config = ServingConfig(operator_token=OPERATOR, max_batch=64, max_wait_ms=400)
    texts = [f"the flight number {i} was late" for i in range(8)]
    bad = b'{"inputs": ["fine", "\\ud800"]}'

    async def drive(url: str) -> tuple[list[httpx.Response], httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            good = [client.post(PREDICT, json={"inputs": [t]}, headers=acme.predict) for t in texts]
            evil = client.post(
                PREDICT, content=bad, headers={**acme.admin, "content-type": "application/json"}
            )
            *answers, refused = await asyncio.gather(*good, evil)
        return answers, refused

    with BackgroundServer(create_app(sqlite_platform, config)) as server:
        # Warm: the model is loaded, so the requests below meet in the batcher.
        assert httpx.post(server.url + PREDICT, json={"inputs": ["hi"]}, headers=acme.predict)
        answers, refused = asyncio.run(drive(server.url))
        alone = httpx.post(
            server.url + PREDICT, json={"inputs": texts}, headers=acme.predict, timeout=60
        ).json()["predictions"]
        scrape = {"Authorization": f"Bearer {OPERATOR}"}
        metrics = {
            (s.name, s.labels.get("le")): s.value
            for f in text_string_to_metric_families(
                httpx.get(server.url + "/metrics", headers=scrape).text
            )
            for s in f.samples
        }
    assert [r.status_code for r in answers] == [200] * len(texts), [r.text for r in answers]
    for r, row in zip(answers, alone, strict=True):
        assert r.json()["predictions"][0][0]["label"] == row[0]["label"]
    assert refused.status_code == 422
    assert refused.json()["detail"].startswith("inputs[1] cannot be processed")
    assert "surrogate" in refused.json()["detail"]
    # The bad request did share a forward pass with others (else this proves nothing).
    assert (
        metrics[("fedtext_batch_requests_bucket", "1.0")]
        < metrics[("fedtext_batch_requests_count", None)]
    )


def test_run_isolated_retries_a_failed_batch_request_by_request() -> None:
    calls: list[list[str]] = []

    def infer(texts: list[str]) -> Rows:
        calls.append(list(texts))
        if "bad" in texts:
            raise ValueError("refused")
        return [[float(len(t))] for t in texts]

    async def run() -> list[Rows | BaseException]:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(infer, executor=pool, max_batch=8, max_wait=0.05)
            return await asyncio.gather(
                batcher.submit(["a"]),
                batcher.submit(["bb", "bad"]),
                batcher.submit(["ccc"]),
                return_exceptions=True,
            )

    ok1, failed, ok2 = asyncio.run(run())
    assert ok1 == [[1.0]] and ok2 == [[3.0]]
    assert isinstance(failed, ValueError)
    assert calls == [["a", "bb", "bad", "ccc"], ["a"], ["bb", "bad"], ["ccc"]]
