"""Write and read encrypted model versions (envelope-encrypted safetensors bytes)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlmodel import Session, col, func, select

from tenancy import crypto
from tenancy.blobs import BlobStore
from tenancy.errors import IntegrityError, NotFound
from tenancy.events import Change, ChangeKind, record
from tenancy.keyring import Keyring
from tenancy.tables import ModelVersion, Tenant
from tenancy.tenants import check_name


def model_aad(tenant_id: str, name: str, version: int) -> bytes:
    """Associated data: a blob only decrypts as this tenant's model name and version."""
    return f"fedtext:model:{tenant_id}:{name}:v{version}".encode()


def store_model_version(
    *,
    session: Session,
    keyring: Keyring,
    store: BlobStore,
    tenant: Tenant,
    name: str,
    spec_json: str,
    weights: bytes,
    run_id: str | None = None,
    metrics: dict[str, Any] | None = None,
    deploy: bool = False,
) -> ModelVersion:
    """Encrypt ``weights`` with the tenant's data key and record a new version."""
    check_name(name, what="model name")
    latest = session.exec(
        select(func.max(ModelVersion.version)).where(
            ModelVersion.tenant_id == tenant.id, ModelVersion.name == name
        )
    ).one()
    version = int(latest or 0) + 1
    blob = crypto.encrypt(
        keyring.data_key(session, tenant.id), weights, model_aad(tenant.id, name, version)
    )
    blob_key = f"{tenant.id}/{name}/v{version}.ftx"
    store.put(blob_key, blob)
    row = ModelVersion(
        tenant_id=tenant.id,
        name=name,
        version=version,
        spec_json=spec_json,
        sha256=hashlib.sha256(blob).hexdigest(),
        blob_key=blob_key,
        size_bytes=len(blob),
        run_id=run_id,
        metrics_json=json.dumps(metrics or {}, sort_keys=True),
    )
    session.add(row)
    session.flush()
    if deploy:
        deploy_version(session=session, tenant_id=tenant.id, name=name, version=version)
    return row


def get_version(*, session: Session, tenant_id: str, name: str, version: int) -> ModelVersion:
    row = session.exec(
        select(ModelVersion).where(
            ModelVersion.tenant_id == tenant_id,
            ModelVersion.name == name,
            ModelVersion.version == version,
        )
    ).first()
    if row is None:
        raise NotFound(f"Model {name!r} has no version {version}.")
    return row


def deployed_version(*, session: Session, tenant_id: str, name: str) -> ModelVersion | None:
    return session.exec(
        select(ModelVersion).where(
            ModelVersion.tenant_id == tenant_id,
            ModelVersion.name == name,
            col(ModelVersion.deployed).is_(True),
        )
    ).first()


def deploy_version(*, session: Session, tenant_id: str, name: str, version: int) -> ModelVersion:
    """Make ``version`` the one that answers predictions (exactly one deployed per name)."""
    target = get_version(session=session, tenant_id=tenant_id, name=name, version=version)
    current = deployed_version(session=session, tenant_id=tenant_id, name=name)
    if current is not None and current.id != target.id:
        current.deployed = False
        session.add(current)
        session.flush()  # the old row first, so the new one never coexists with it
    target.deployed = True
    session.add(target)
    session.flush()
    record(session, Change(ChangeKind.version_deployed, tenant_id, name))
    return target


def set_quantize(
    *, session: Session, tenant_id: str, name: str, version: int, quantize: str | None
) -> ModelVersion:
    """Choose how a version is served (the mode is checked by the serving layer)."""
    row = get_version(session=session, tenant_id=tenant_id, name=name, version=version)
    row.quantize = quantize
    session.add(row)
    session.flush()
    record(session, Change(ChangeKind.serving_options, tenant_id, name))
    return row


def read_model_weights(
    *, session: Session, keyring: Keyring, store: BlobStore, row: ModelVersion
) -> bytes:
    """Fetch, integrity-check and decrypt a version's weights, in memory only."""
    blob = store.get(row.blob_key)
    if hashlib.sha256(blob).hexdigest() != row.sha256:
        raise IntegrityError(
            f"The stored blob of {row.name} v{row.version} does not match its recorded SHA-256."
        )
    return crypto.decrypt(
        keyring.data_key(session, row.tenant_id),
        blob,
        model_aad(row.tenant_id, row.name, row.version),
        what=f"model {row.name} v{row.version}",
    )
