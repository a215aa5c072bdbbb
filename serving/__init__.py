"""Tenant-isolated FastAPI service: encrypted model registry, model cache, predictions."""
