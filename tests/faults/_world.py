"""A small platform world for the fault tests: tenants, keys and stored model versions."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import create_engine, text
from sqlmodel import Session, select

from fedtext.bootstrap import platform_from_settings, upgrade_schema
from fedtext.settings import Settings
from models import ModelSpec, build_model, save_weights
from tenancy.db import session_scope
from tenancy.platform import Platform
from tenancy.registry import read_model_weights, store_model_version
from tenancy.tables import ModelVersion
from tenancy.tenants import Scope, create_api_key, create_tenant

LABELS = ["negative", "neutral", "positive"]


def new_database(cluster_url: str) -> str:
    """A fresh database on the private cluster; its URL."""
    name = "f" + uuid.uuid4().hex[:12]
    engine = create_engine(cluster_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return cluster_url.rsplit("/", 1)[0] + "/" + name


def open_platform(env: dict[str, str]) -> Platform:
    os.environ["FEDTEXT_KEK"] = env["FEDTEXT_KEK"]  # this process reads as the servers do
    settings = Settings(
        data_dir=Path(env["FEDTEXT_DATA_DIR"]),
        database_url=env["FEDTEXT_DATABASE_URL"],
        key_provider="env",
        blob_store=env.get("FEDTEXT_BLOB_STORE", "file"),  # type: ignore[arg-type]
    )
    return platform_from_settings(settings)


def random_head(seed: int) -> tuple[str, bytes]:
    spec = ModelSpec.create("encoder-head", LABELS)
    torch.manual_seed(seed)
    head = build_model(spec)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_()
    return spec.to_json(), save_weights(head)


def build_world(env: dict[str, str], tenants: tuple[str, ...] = ("acme", "globex"),
                versions: int = 2) -> dict[str, Any]:  # fmt: skip
    """Each tenant: an admin and a predict key, ``versions`` of 'sentiment', v1 deployed."""
    platform = open_platform(env)
    upgrade_schema(platform)
    out: dict[str, Any] = {}
    with session_scope(platform.engine) as session:
        for name in tenants:
            tenant = create_tenant(session=session, keyring=platform.keyring, name=name)
            _, admin = create_api_key(session=session, tenant=tenant, scopes=[Scope.admin])
            key, predict = create_api_key(session=session, tenant=tenant, scopes=[Scope.predict])
            out[name] = {"id": tenant.id, "admin": admin, "predict": predict, "key_id": key.id}
            for seed in range(1, versions + 1):
                spec_json, weights = random_head(seed)
                store_model_version(
                    session=session, keyring=platform.keyring, store=platform.store,
                    tenant=tenant, name="sentiment", spec_json=spec_json,
                    weights=weights, deploy=seed == 1,
                )  # fmt: skip
    platform.engine.dispose()
    return out


def check_versions(env: dict[str, str]) -> dict[str, Any]:
    """Every recorded version decrypts; exactly one deployed per tenant and name.

    Returns counts: versions, deployed per (tenant, name).
    """
    platform = open_platform(env)
    deployed: dict[tuple[str, str], int] = {}
    count = 0
    with Session(platform.engine) as session:
        for row in session.exec(select(ModelVersion)).all():
            read_model_weights(session=session, keyring=platform.keyring, store=platform.store,
                               row=row)  # fmt: skip  # raises on a half-written blob
            count += 1
            if row.deployed:
                key = (row.tenant_id, row.name)
                deployed[key] = deployed.get(key, 0) + 1
    platform.engine.dispose()
    assert all(n == 1 for n in deployed.values()), deployed
    return {"versions": count, "deployed": deployed}
