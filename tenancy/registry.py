"""Write and read encrypted model versions (envelope-encrypted safetensors bytes).

Each version row is signed by the platform's signing key (``tenancy.signing``: on insert
and on every change, its deployment state included). A row whose signature does not
verify is not acted on: ``deployed_version`` never returns it (``untrusted_deployment``
says so when the only deployed rows are such), ``read_model_weights`` refuses it, and it is
neither deployed nor changed (``UntrustedDeployment``). So a database writer without the
signing key cannot deploy a version the tenant's policy refused, nor point a version at
another blob.
"""

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
from tenancy.signing import version_row_trusted
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


class UntrustedDeployment(IntegrityError):
    """A version row whose signature does not verify cannot be deployed or changed."""


def _deployed_rows(session: Session, tenant_id: str, name: str) -> list[ModelVersion]:
    return list(
        session.exec(
            select(ModelVersion).where(
                ModelVersion.tenant_id == tenant_id,
                ModelVersion.name == name,
                col(ModelVersion.deployed).is_(True),
            )
        )
    )


def deployed_version(*, session: Session, tenant_id: str, name: str) -> ModelVersion | None:
    """The version of ``name`` deployed through the platform, or None when none is.

    A row marked deployed whose signature does not verify (written around the platform)
    is ignored (logged): it is never served, and a release compares with and replaces it
    as if nothing were deployed. ``untrusted_deployment`` says why a model has none. One
    signature check per call: the predict path calls this when it fills its memo, not per
    request.
    """
    rows = _deployed_rows(session, tenant_id, name)
    engine = session.get_bind().engine
    return next((row for row in rows if version_row_trusted(engine, row)), None)


def untrusted_deployment(*, session: Session, tenant_id: str, name: str) -> str | None:
    """Why ``name`` has no deployed version although rows are marked deployed (their
    signatures do not verify), for the operator and a 5xx; None when that is not so."""
    rows = _deployed_rows(session, tenant_id, name)
    engine = session.get_bind().engine
    if not rows or any(version_row_trusted(engine, row) for row in rows):
        return None
    listed = ", ".join(f"v{r.version}" for r in rows)
    return (
        f"The deployment of model {name!r} ({listed}) is not signed by the platform: it is "
        "not served. The operator checks it with `fedtext audit verify`; deploying or "
        "rolling back a version through the platform replaces it."
    )


def _as_deployed(row: ModelVersion) -> ModelVersion:
    """A detached copy of ``row`` marked deployed (what deploying it would store)."""
    values = {c.key: getattr(row, c.key) for c in ModelVersion.__table__.columns}  # type: ignore[attr-defined]
    return ModelVersion(**{**values, "deployed": True})


def deploy_version(*, session: Session, tenant_id: str, name: str, version: int) -> ModelVersion:
    """Make ``version`` the one that answers predictions (exactly one deployed per name).

    Every other row marked deployed is cleared, a forged one included, so deploying or
    rolling back through the platform repairs a deployment written around it.
    """
    target = get_version(session=session, tenant_id=tenant_id, name=name, version=version)
    engine = session.get_bind().engine
    # A version undeployed around the platform verifies once deployed again (as signed).
    if not version_row_trusted(engine, target) and not version_row_trusted(
        engine, _as_deployed(target)
    ):
        raise UntrustedDeployment(
            f"Model {name!r} v{version} is not signed by the platform (changed around it, or "
            "not yet signed with `fedtext audit sign-existing`): it is not deployed."
        )
    cleared = False
    for current in _deployed_rows(session, tenant_id, name):
        if current.id != target.id:
            current.deployed = False
            session.add(current)
            cleared = True
    if cleared:
        session.flush()  # the old rows first, so the new one never coexists with them
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
    if not version_row_trusted(session.get_bind().engine, row):
        raise UntrustedDeployment(
            f"Model {name!r} v{version} is not signed by the platform: its serving options "
            "are not changed."
        )
    row.quantize = quantize
    session.add(row)
    session.flush()
    record(session, Change(ChangeKind.serving_options, tenant_id, name))
    return row


def read_model_weights(
    *, session: Session, keyring: Keyring, store: BlobStore, row: ModelVersion
) -> bytes:
    """Fetch, integrity-check and decrypt a version's weights, in memory only (IntegrityError
    for a row whose signature does not verify: its blob key or hash may not be ours)."""
    blob = store.get(row.blob_key)
    if hashlib.sha256(blob).hexdigest() != row.sha256:
        raise IntegrityError(
            f"The stored blob of {row.name} v{row.version} does not match its recorded SHA-256."
        )
    weights = crypto.decrypt(
        keyring.data_key(session, row.tenant_id),
        blob,
        model_aad(row.tenant_id, row.name, row.version),
        what=f"model {row.name} v{row.version}",
    )
    # After decryption, so that a missing key is reported as such; before anything is
    # returned.
    if not version_row_trusted(session.get_bind().engine, row):
        raise IntegrityError(
            f"The record of {row.name} v{row.version} is not signed by the platform (changed "
            "around it, or not yet signed with `fedtext audit sign-existing`)."
        )
    return weights
