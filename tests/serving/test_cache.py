"""The model cache: single-flight loads, count and byte bounds, eviction frees plaintext."""

from __future__ import annotations

import gc
import threading
import weakref
from pathlib import Path

import pytest
from sqlmodel import Session

from serving.metrics import ServingMetrics
from serving.runtime.model_cache import ModelCache, ModelLoadError, ServedModel
from tenancy.blobs import LocalBlobStore
from tenancy.platform import Platform
from tests.factories import make_tenant, store_tiny_model


def _tenants(platform: Platform, n: int) -> list[str]:
    ids = []
    for i in range(n):
        t = make_tenant(platform, f"t{i}")
        store_tiny_model(platform, t.tenant, seed=i)
        ids.append(t.tenant.id)
    return ids


def _get(cache: ModelCache, platform: Platform, tenant_id: str) -> ServedModel:
    with Session(platform.engine) as session:
        return cache.get_deployed(session, tenant_id, "lstm")[0]


def _value(metrics: ServingMetrics, name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


def test_concurrent_first_requests_cause_exactly_one_load(platform: Platform) -> None:
    (tenant_id,) = _tenants(platform, 1)
    metrics = ServingMetrics()
    cache = ModelCache(platform, metrics=metrics)
    barrier = threading.Barrier(12)
    got: list[ServedModel] = []

    def worker() -> None:
        barrier.wait()
        got.append(_get(cache, platform, tenant_id))

    threads = [threading.Thread(target=worker) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 12 and all(g is got[0] for g in got)
    loads = _value(
        metrics,
        "fedtext_model_load_duration_seconds_count",
        {"family": "lstm", "quantize": "None"},
    )
    assert loads == 1
    assert _value(metrics, "fedtext_model_cache_misses_total") == 1
    assert _get(cache, platform, tenant_id) is got[0]
    assert _value(metrics, "fedtext_model_cache_hits_total") >= 1


class GatedStore(LocalBlobStore):
    """A real local store whose reads wait for a gate: a load that takes as long as we like."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def get(self, key: str) -> bytes:
        self.waiting.set()
        assert self.gate.wait(timeout=30)
        return super().get(key)


def test_a_slow_load_does_not_block_other_models(sqlite_platform: Platform) -> None:
    a, b = _tenants(sqlite_platform, 2)
    store = GatedStore(sqlite_platform.store.root)  # type: ignore[attr-defined]
    gated = Platform(sqlite_platform.engine, sqlite_platform.keyring, store)
    cache = ModelCache(gated)
    store.gate.set()
    _get(cache, gated, a)
    store.gate.clear()
    store.waiting.clear()
    loader = threading.Thread(target=_get, args=(cache, gated, b))
    loader.start()
    assert store.waiting.wait(timeout=30)  # b's load is under way, stuck in the store
    assert _get(cache, gated, a).tenant_id == a  # a is served meanwhile ...
    assert loader.is_alive()  # ... not after b's load gave up
    store.gate.set()
    loader.join(timeout=30)
    assert [k[0] for k in cache.cached_keys()] == [a, b]


def test_count_bound_evicts_the_least_recently_used(platform: Platform) -> None:
    a, b, c = _tenants(platform, 3)
    metrics = ServingMetrics()
    cache = ModelCache(platform, max_models=2, metrics=metrics)
    _get(cache, platform, a)
    _get(cache, platform, b)
    _get(cache, platform, a)  # a is now the most recently used
    _get(cache, platform, c)
    assert [k[0] for k in cache.cached_keys()] == [a, c]
    assert _value(metrics, "fedtext_model_cache_evictions_total") == 1
    assert _value(metrics, "fedtext_model_cache_models") == 2


def test_byte_bound_evicts_before_the_count_bound(platform: Platform) -> None:
    a, b, c = _tenants(platform, 3)
    probe = ModelCache(platform)
    one = _get(probe, platform, a).nbytes
    assert one > 0
    cache = ModelCache(platform, max_models=10, max_bytes=int(one * 2.5))
    for tenant_id in (a, b, c):
        _get(cache, platform, tenant_id)
    assert [k[0] for k in cache.cached_keys()] == [b, c]
    assert cache.nbytes == 2 * one <= cache.max_bytes


def test_eviction_frees_the_decrypted_weights(sqlite_platform: Platform) -> None:
    a, b = _tenants(sqlite_platform, 2)
    cache = ModelCache(sqlite_platform, max_models=1)
    served = _get(cache, sqlite_platform, a)
    model_ref = weakref.ref(served.model)
    weight_ref = weakref.ref(next(served.model.parameters()))
    del served
    _get(cache, sqlite_platform, b)  # evicts a
    gc.collect()
    assert model_ref() is None and weight_ref() is None
    assert [k[0] for k in cache.cached_keys()] == [b]


def test_a_tampered_blob_fails_every_waiter_and_is_not_cached(platform: Platform) -> None:
    t = make_tenant(platform, "acme")
    row = store_tiny_model(platform, t.tenant)
    blob = bytearray(platform.store.get(row.blob_key))
    blob[-1] ^= 1
    platform.store.put(row.blob_key, bytes(blob))
    metrics = ServingMetrics()
    cache = ModelCache(platform, metrics=metrics)
    for _ in range(2):  # not remembered: the second lookup tries again and fails again
        with pytest.raises(ModelLoadError) as info:
            _get(cache, platform, t.tenant.id)
        assert info.value.reason == "integrity"
    assert cache.cached_keys() == []
    assert _value(metrics, "fedtext_model_load_failures_total", {"reason": "integrity"}) == 2


def test_a_row_made_stale_by_a_data_key_rotation_loads_as_it_is_now(platform: Platform) -> None:
    from serving.runtime.model_cache import find_deployed
    from tenancy.rotation import rotate_dek

    t = make_tenant(platform, "acme")
    store_tiny_model(platform, t.tenant)
    cache = ModelCache(platform)
    with Session(platform.engine) as session:
        stale = find_deployed(session, t.tenant.id, "lstm")
        old_blob = stale.blob_key
        # Another process rotates the data key between our read and our load.
        rotate_dek(platform.engine, platform.keyring, platform.store, tenant="acme")
        with pytest.raises(ModelLoadError) as raised:
            cache.get(session, stale)  # the old blob is gone: this is the race's 500
        assert raised.value.reason == "missing"
        served, current = cache.get_current(session, stale)
    assert current.blob_key != old_blob
    assert served.predict(["hello there"], top_k=1)[0][0][0] in served.spec.labels
