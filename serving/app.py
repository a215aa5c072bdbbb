"""The FastAPI application factory."""

from __future__ import annotations

from fastapi import FastAPI

from serving.config import ServingConfig
from serving.registry import ModelCache
from serving.routers import health, keys, models, privacy, tenants
from tenancy.platform import Platform


def create_app(platform: Platform, config: ServingConfig | None = None) -> FastAPI:
    config = config or ServingConfig()
    app = FastAPI(title="fedtext", version="0.1.0")
    app.state.platform = platform
    app.state.config = config
    app.state.cache = ModelCache(platform, capacity=config.cache_models)
    for module in (health, tenants, keys, models, privacy):
        app.include_router(module.router)
    return app
