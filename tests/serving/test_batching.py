"""Micro-batching: concurrent requests share forward passes, with unchanged answers."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedtext.server_thread import BackgroundServer
from serving.app import create_app
from serving.config import ServingConfig
from serving.runtime.batching import MicroBatcher, Rows
from tenancy.platform import Platform
from tests.factories import make_tenant, store_tiny_model


def _samples(text: str) -> dict[str, float]:
    return {
        s.name: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if not s.labels
    }


def test_batches_respect_max_batch_and_keep_order() -> None:
    seen: list[list[str]] = []
    gate = threading.Event()

    def infer(texts: list[str]) -> Rows:
        gate.wait(5)
        seen.append(list(texts))
        return [[float(t)] for t in texts]

    async def run() -> list[Rows]:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(infer, executor=pool, max_batch=4, max_wait=0.05)
            calls = [batcher.submit([str(i)]) for i in range(10)]
            asyncio.get_running_loop().call_later(0.01, gate.set)
            return await asyncio.gather(*calls)

    out = asyncio.run(run())
    assert out == [[[float(i)]] for i in range(10)]
    assert [len(b) for b in seen] == [4, 4, 2]


def test_a_failed_batch_fails_each_of_its_requests() -> None:
    def infer(texts: list[str]) -> Rows:
        raise RuntimeError("forward failed")

    async def run() -> list[object]:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(infer, executor=pool, max_batch=8, max_wait=0.01)
            return await asyncio.gather(
                *(batcher.submit(["x"]) for _ in range(3)), return_exceptions=True
            )

    out = asyncio.run(run())
    assert all(isinstance(e, RuntimeError) for e in out)


def test_bad_batcher_settings_are_refused() -> None:
    with ThreadPoolExecutor(1) as pool:
        with pytest.raises(ValueError, match="max_batch"):
            MicroBatcher(lambda t: [], executor=pool, max_batch=0, max_wait=0.0)
        with pytest.raises(ValueError, match="max_wait"):
            MicroBatcher(lambda t: [], executor=pool, max_batch=1, max_wait=-1)


@pytest.mark.slow
def test_concurrent_requests_over_http_share_forward_passes(sqlite_platform: Platform) -> None:
    acme = make_tenant(sqlite_platform, "acme")
    store_tiny_model(sqlite_platform, acme.tenant)
    # A long wait makes coalescing certain on a busy machine; answers must not change.
    operator = "op-" + "m" * 40
    app = create_app(
        sqlite_platform, ServingConfig(operator_token=operator, max_batch=64, max_wait_ms=200)
    )
    texts = [f"the flight number {i} was late" for i in range(24)]

    async def drive(url: str) -> list[dict[str, object]]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            rs = await asyncio.gather(
                *(
                    client.post(
                        "/v1/models/lstm/predict",
                        json={"inputs": [t], "top_k": 3},
                        headers=acme.predict,
                    )
                    for t in texts
                )
            )
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
        return [r.json() for r in rs]

    with BackgroundServer(app) as server:
        batched = asyncio.run(drive(server.url))
        scrape = {"Authorization": f"Bearer {operator}"}
        metrics = _samples(httpx.get(f"{server.url}/metrics", headers=scrape).text)
        alone = httpx.post(
            f"{server.url}/v1/models/lstm/predict",
            json={"inputs": texts, "top_k": 3},
            headers=acme.predict,
            timeout=60,
        ).json()
    assert metrics["fedtext_batch_size_sum"] == len(texts)
    assert metrics["fedtext_batch_size_count"] < len(texts)  # some forward served > 1 request
    assert metrics["fedtext_batch_requests_sum"] == len(texts)
    for one, row in zip(batched, alone["predictions"], strict=True):
        (pred,) = one["predictions"]  # type: ignore[misc]
        assert [p["label"] for p in pred] == [p["label"] for p in row]
        for p, q in zip(pred, row, strict=True):
            assert p["score"] == pytest.approx(q["score"], abs=1e-5)
