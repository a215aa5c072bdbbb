"""Prometheus metrics of one app instance (its own registry, so apps in one process never mix)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "ServingMetrics"]

# Latency buckets from 1 ms to 10 s: predictions live in the low milliseconds, loads near 10 ms.
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServingMetrics:
    """Request, batching and model-cache metrics, rendered in the Prometheus text format."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # Labels are route templates ("/v1/models/{name}/predict"), never raw paths: bounded
        # cardinality, and no tenant-chosen string ends up in the metrics.
        self.requests = Counter(
            "fedtext_http_requests", "HTTP requests answered.", ["route", "method", "status"],
            registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "fedtext_http_request_duration_seconds", "Time to answer an HTTP request.",
            ["route", "method"], buckets=_LATENCY, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "fedtext_batch_size", "Inputs per model forward pass (micro-batch size).",
            buckets=_BATCH, registry=r,
        )  # fmt: skip
        self.batch_requests = Histogram(
            "fedtext_batch_requests", "Requests coalesced into one forward pass.",
            buckets=_BATCH, registry=r,
        )  # fmt: skip
        self.inference = Histogram(
            "fedtext_inference_duration_seconds", "Tokenize + forward time of one batch.",
            buckets=_LATENCY, registry=r,
        )  # fmt: skip
        self.cache_hits = Counter(
            "fedtext_model_cache_hits", "Model lookups answered from memory.", registry=r
        )
        self.cache_misses = Counter(
            "fedtext_model_cache_misses", "Model lookups that needed a load.", registry=r
        )
        self.cache_evictions = Counter(
            "fedtext_model_cache_evictions", "Decrypted models dropped from memory.", registry=r
        )
        self.cache_models = Gauge(
            "fedtext_model_cache_models", "Decrypted models held in memory.", registry=r
        )
        self.cache_bytes = Gauge(
            "fedtext_model_cache_bytes", "Bytes of decrypted weights held in memory.", registry=r
        )
        self.load_seconds = Histogram(
            "fedtext_model_load_duration_seconds",
            "Cold load of a model: fetch, SHA-256 check, decrypt, deserialize, prepare.",
            ["family", "quantize"], buckets=_LATENCY, registry=r,
        )  # fmt: skip
        self.load_failures = Counter(
            "fedtext_model_load_failures", "Loads that failed (integrity, decryption, format).",
            ["reason"], registry=r,
        )  # fmt: skip

    def render(self) -> bytes:
        return generate_latest(self.registry)
