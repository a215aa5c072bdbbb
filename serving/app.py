"""The FastAPI application factory."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from prometheus_client import Histogram
from sqlmodel import Session

from models import ModelSpec
from models.inputs import text_inputs
from runs.lifecycle import HEARTBEAT_SECONDS, reap_orphaned_runs
from serving.config import ServingConfig
from serving.credentials import CredentialMiddleware
from serving.errors import add_error_handlers
from serving.launcher import RunLauncher
from serving.limits import BodySizeLimitMiddleware, Limits, RateLimitMiddleware
from serving.metrics import ServingMetrics
from serving.observability import ObservabilityMiddleware
from serving.predict import PredictService
from serving.protocols.console import router as console_router
from serving.protocols.oip import rest as oip_rest
from serving.protocols.oip.server import GrpcEndpoint
from serving.protocols.v1 import (
    health,
    keys,
    model_admin,
    models,
    nodes,
    partners,
    policy,
    privacy,
    runs,
    tenants,
)
from serving.protocols.v1.fastlane import PREDICT_ROUTE, PredictFastLane
from serving.refusals import add_refusal_handler
from serving.runtime.batching import InputRejected, MicroBatcher, Rows
from serving.runtime.lookups import PredictLookups
from serving.runtime.model_cache import ModelCache, ServedModel, run_batch
from serving.runtime.shared_encoder import SharedEncoders
from tenancy import events
from tenancy.platform import Platform

log = logging.getLogger("fedtext.serving")


def _init_inference_thread(torch_threads: int | None) -> None:
    # OpenMP thread counts are per thread: set it where the forward passes run.
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)


def _timed_batch(
    histogram: Histogram,
    model: torch.nn.Module,
    spec: ModelSpec,
    texts: list[str],
) -> Rows:
    started = time.perf_counter()
    try:
        rows = run_batch(model, spec, texts)
    except Exception:
        rejected = first_rejected_input(spec, texts)
        if rejected is None:
            raise  # not an input's fault: the request fails as a server error
        raise rejected from None
    histogram.observe(time.perf_counter() - started)
    return rows


def first_rejected_input(spec: ModelSpec, texts: list[str]) -> InputRejected | None:
    """The first input that ``spec``'s tokenizer (or encoder) refuses on its own, if any.

    Called only after a batch failed, to tell a client's bad input (a 422 naming it) from
    a fault of the model or the server (a 500).
    """
    for i, text in enumerate(texts):
        try:
            text_inputs(spec, [text])
        except Exception as exc:
            surrogate = next((c for c in text if 0xD800 <= ord(c) <= 0xDFFF), None)
            reason = (
                f"it holds a lone surrogate (U+{ord(surrogate):04X}), which is not Unicode "
                "text; send UTF-8"
                if surrogate is not None
                else f"the model's tokenizer refused it ({type(exc).__name__})"
            )
            return InputRejected(i, reason)
    return None


# How often the API looks for runs whose worker is gone.
REAP_SECONDS = 2 * HEARTBEAT_SECONDS


async def _refresh_lookups(platform: Platform, lookups: PredictLookups) -> None:
    """Re-read the predict path's memo every ``ttl`` seconds (two queries, off the loop)."""

    def refresh() -> None:
        with Session(platform.engine, expire_on_commit=False) as session:
            lookups.refresh(session)

    while True:
        await asyncio.sleep(lookups.ttl)
        try:
            await run_in_threadpool(refresh)
        except Exception:  # the database is away: entries age out, requests ask it directly
            log.warning("refreshing the predict lookups failed", exc_info=True)


def _reap_and_sweep(platform: Platform, launcher: RunLauncher | None) -> list[str]:
    """Mark orphaned runs interrupted, then remove what their killed workers left on disk.

    The launcher's own start-up sweep runs before the first reap, while such a run still
    looks active: without this second sweep a SIGKILLed worker's sentence vectors stayed in
    the scratch directory (found by tests/faults, API and worker killed mid-run).
    """
    reaped = reap_orphaned_runs(platform.engine)
    if reaped and launcher is not None:
        launcher.sweep()
    return reaped


async def _reap_runs(platform: Platform, launcher: RunLauncher | None) -> None:
    """Mark runs whose worker died while this API is up interrupted (reads never write)."""
    while True:
        await asyncio.sleep(REAP_SECONDS)
        try:
            await run_in_threadpool(_reap_and_sweep, platform, launcher)
        except Exception:
            log.warning("checking for orphaned runs failed", exc_info=True)


def create_app(
    platform: Platform,
    config: ServingConfig | None = None,
    *,
    limits: Limits | None = None,
    run_launcher: RunLauncher | None = None,
    grpc: GrpcEndpoint | None = None,
) -> FastAPI:
    """The API; ``run_launcher`` (from ``fedtext``) lets ``POST /v1/runs`` start runs;
    ``grpc``: also serve the Open Inference Protocol over gRPC there
    (serving/protocols/oip/grpc_server.py)."""
    config = config or ServingConfig()
    limits = limits or Limits()
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
            _timed_batch,
            metrics.inference,
            served.model,
            served.spec,
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
        # Runs whose worker died while no API was up are marked interrupted (resumable).
        _reap_and_sweep(platform, run_launcher)
        reaper = asyncio.create_task(_reap_runs(platform, run_launcher))
        refresher = (
            asyncio.create_task(_refresh_lookups(platform, lookups)) if lookups.ttl > 0 else None
        )
        grpc_server = None
        if grpc is not None:  # imported here: its protocol modules clash with tritonclient's
            from serving.protocols.oip.grpc_server import start_grpc_server

            grpc_server = await start_grpc_server(service, grpc)
        yield
        if grpc_server is not None:
            await grpc_server.stop(grace=5)
        reaper.cancel()
        if refresher is not None:
            refresher.cancel()
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
        heads=SharedEncoders(
            executor=executor,
            runtime=config.encoder_runtime,
            precision=config.encoder_precision,
            device=config.encoder_device,
            max_batch=config.max_batch,
            max_wait=config.max_wait_ms / 1000,
            max_inflight=config.inference_threads,
            on_batch=observe_batch,
            observe=metrics.inference.observe,
        )
        if config.shared_encoder
        else None,
    )
    app.state.lookups = lookups = PredictLookups(config.lookup_ttl_s)
    app.state.predict = service = PredictService(platform, app.state.cache, lookups, config)
    # Tenancy's write functions in this process tell the service what they committed (held
    # weakly: a dropped app stops listening); the refresher above covers other processes.
    events.subscribe(service.tenancy_changed)
    app.state.run_launcher = run_launcher
    for module in (health, tenants, keys, model_admin, models, partners, privacy, runs):
        app.include_router(module.router)
    app.include_router(policy.router)  # each tenant's own governance, /v1/policy
    app.include_router(nodes.router)  # each tenant's enrolled node keys, /v1/federation/nodes
    app.include_router(oip_rest.router)  # the Open Inference Protocol (V2) over REST, at /v2
    app.include_router(console_router)  # the web console at /console, over the same /v1
    app.add_middleware(
        PredictFastLane,
        route=next(r for r in models.router.routes if getattr(r, "path", "") == PREDICT_ROUTE),
        service=service,
    )
    # Inside the observability middleware, so 413 and 429 are logged and counted too.
    if limits.rate_per_second is not None or limits.failed_auth_per_second is not None:
        app.add_middleware(
            RateLimitMiddleware,
            rate=limits.rate_per_second,
            burst=limits.burst,
            max_buckets=limits.max_buckets,
            failed_auth_rate=limits.failed_auth_per_second,
            failed_auth_burst=limits.failed_auth_burst,
        )
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=limits.max_body_bytes)
    # Outside every layer that reads the credential: two Authorization headers are a 400.
    app.add_middleware(CredentialMiddleware)
    app.add_middleware(ObservabilityMiddleware, metrics=metrics)
    add_error_handlers(app)
    add_refusal_handler(app)  # the predict service's refusals, as serving/refusals.py maps them
    _document_string_details(app)
    return app


def _document_string_details(app: FastAPI) -> None:
    """Say in /openapi.json that a 422's ``detail`` may be a message (our limits) or a list.

    Routes answer 422 with a sentence naming the limit; FastAPI documents only its own
    validation list, so a client generated from the schema would reject our messages.
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        props = schema.get("components", {}).get("schemas", {}).get("HTTPValidationError", {})
        detail = props.get("properties", {}).get("detail")
        if detail is not None and "anyOf" not in detail:
            listed = {k: v for k, v in detail.items() if k != "title"}
            props["properties"]["detail"] = {
                "title": "Detail",
                "anyOf": [{"type": "string"}, listed],
            }
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
