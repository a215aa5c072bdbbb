"""The FastAPI application factory."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI

from serving.batching import MicroBatcher
from serving.config import ServingConfig
from serving.metrics import ServingMetrics
from serving.observability import ObservabilityMiddleware
from serving.registry import ModelCache, ServedModel, run_batch
from serving.routers import health, keys, models, privacy, tenants
from tenancy.platform import Platform


def _init_inference_thread(torch_threads: int | None) -> None:
    # OpenMP thread counts are per thread: set it where the forward passes run.
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)


def create_app(platform: Platform, config: ServingConfig | None = None) -> FastAPI:
    config = config or ServingConfig()
    metrics = ServingMetrics()
    # Forward passes run here, off the event loop; torch releases the GIL inside them.
    executor = ThreadPoolExecutor(
        config.inference_threads,
        thread_name_prefix="fedtext-infer",
        initializer=_init_inference_thread,
        initargs=(config.torch_threads,),
    )

    def observe_batch(inputs: int, requests: int) -> None:
        metrics.batch_size.observe(inputs)
        metrics.batch_requests.observe(requests)

    def make_batcher(served: ServedModel) -> MicroBatcher:
        # The batcher holds the model's tensors, not the ServedModel: no reference cycle,
        # so an evicted model's plaintext is freed as soon as its last request is done.
        infer = functools.partial(
            run_batch, served.model, served.tokenizer, served.spec.max_seq_len
        )
        return MicroBatcher(
            infer,
            executor=executor,
            max_batch=config.max_batch,
            max_wait=config.max_wait_ms / 1000,
            max_inflight=config.inference_threads,
            on_batch=observe_batch,
        )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if config.torch_threads is not None:
            torch.set_num_threads(config.torch_threads)
        yield
        app.state.cache.clear()
        executor.shutdown(wait=True)

    app = FastAPI(title="fedtext", version="0.1.0", lifespan=lifespan)
    app.state.platform = platform
    app.state.config = config
    app.state.metrics = metrics
    app.state.cache = ModelCache(
        platform,
        max_models=config.cache_models,
        max_bytes=config.cache_bytes,
        metrics=metrics,
        make_batcher=make_batcher,
    )
    app.add_middleware(ObservabilityMiddleware, metrics=metrics)
    for module in (health, tenants, keys, models, privacy):
        app.include_router(module.router)
    return app
