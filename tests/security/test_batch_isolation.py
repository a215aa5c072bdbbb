"""One client's bad input fails only its own request, never the batch it shares (finding 2).

Text that is not Unicode (a lone surrogate) is refused before batching, so it costs no
forward pass; any input a model's tokenizer still refuses fails a batch that is then
rerun request by request (``run_isolated``), with the real model below."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedtext.server_thread import BackgroundServer
from serving.app import create_app
from serving.config import ServingConfig
from serving.runtime.batching import MicroBatcher, Rows, run_isolated
from serving.runtime.model_cache import load_served_model
from tenancy.db import session_scope
from tenancy.platform import Platform
from tests.factories import make_tenant, store_tiny_model

PREDICT = "/v1/models/lstm/predict"
OPERATOR = "op-" + "i" * 40


@pytest.mark.slow
def test_a_lone_surrogate_among_concurrent_requests_fails_alone_before_any_batch(
    sqlite_platform: Platform,
) -> None:
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
    assert refused.json()["detail"].startswith("inputs[1] holds a lone surrogate (U+D800)")
    # Concurrent requests did share forward passes, and the refused one reached none:
    # the model saw the warm-up input, the eight concurrent ones and the eight alone.
    assert (
        metrics[("fedtext_batch_requests_bucket", "1.0")]
        < metrics[("fedtext_batch_requests_count", None)]
    )
    assert metrics[("fedtext_batch_size_sum", None)] == 1 + 2 * len(texts)


def test_a_batch_the_real_model_refuses_is_rerun_request_by_request(
    sqlite_platform: Platform,
) -> None:
    acme = make_tenant(sqlite_platform, "acme")
    row = store_tiny_model(sqlite_platform, acme.tenant)
    with session_scope(sqlite_platform.engine) as session:
        served = load_served_model(session, sqlite_platform, row)
    good = ["the flight was late", "lovely crew"]
    texts = [good[0], "fine", "\ud800", good[1]]  # three requests: [0:1], [1:3], [3:4]
    with pytest.raises(TypeError):  # the whole batch fails in the model's tokenizer
        served.infer(texts)
    first, refused, last = run_isolated(served.infer, texts, [(0, 1), (1, 3), (3, 4)])
    assert isinstance(refused, TypeError)
    assert first == served.infer(good[:1]) and last == served.infer(good[1:])


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
