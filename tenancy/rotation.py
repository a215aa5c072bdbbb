"""Key lifecycle: KEK rotation, data-key rotation and tenant deletion (crypto-shredding)."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from tenancy import crypto
from tenancy.blobs import BlobStore
from tenancy.checkpoints import (
    WRITING,
    drop_cancelled_checkpoints,
    forget_checkpoint,
    reencrypt_checkpoints,
)
from tenancy.db import checkpoint_wal, session_scope
from tenancy.errors import IntegrityError, NotFound
from tenancy.events import Change, ChangeKind, record
from tenancy.keyring import Keyring
from tenancy.registry import model_aad
from tenancy.tables import ApiKey, DataKey, ModelVersion, Tenant, TrainingRun, utcnow
from tenancy.tenants import forget_partners


@dataclass(frozen=True)
class KekRotation:
    new_version: int
    rewrapped: int
    retired: list[int]
    kept: list[int]  # old versions still in use (e.g. by a run checkpoint)
    # Checkpoints (with ``store``): cancelled runs' dropped, the others re-encrypted under
    # the new version, so only a run still writing its checkpoints keeps an old one.
    dropped_checkpoints: int = 0
    reencrypted_checkpoints: int = 0


def kek_versions_in_use(session: Session) -> set[int]:
    """KEK versions something still needs: wrapped data keys and run checkpoints."""
    used = set(session.exec(select(DataKey.kek_version).distinct()))
    used |= {
        v
        for v in session.exec(
            select(TrainingRun.checkpoint_kek_version).where(
                col(TrainingRun.checkpoint_blob).is_not(None)
            )
        )
        if v is not None
    }
    return used


def rotate_kek(
    engine: Engine,
    keyring: Keyring,
    *,
    grace_seconds: float = 1.0,
    store: BlobStore | None = None,
) -> KekRotation:
    """New KEK version; every data key rewrapped; unused old versions retired.

    Each data key is rewrapped in its own short transaction (one UPDATE of the wrapped
    bytes and their KEK version together), so a reader sees the old or the new pair and
    both KEK versions are readable meanwhile. Old versions are retired only after
    ``grace_seconds``, so a reader that fetched a row just before its rewrap still finds
    the KEK it was wrapped with. With the blob ``store``, run checkpoints no longer keep
    an old version in use: a cancelled run's is dropped, the others (resumable runs, kept
    heads) are re-encrypted; only a run that is still writing its checkpoints keeps one.
    """
    provider = keyring.provider
    new_version = provider.add_version()
    with Session(engine) as session:
        ids = list(session.exec(select(DataKey.id).where(DataKey.kek_version != new_version)))
    rewrapped = 0
    for key_id in ids:
        with session_scope(engine) as session:
            row = session.exec(
                select(DataKey).where(DataKey.id == key_id).with_for_update()
            ).first()
            if row is None or row.kek_version == new_version:
                continue  # deleted or rotated meanwhile
            keyring.rewrap_one(session, row, new_version)
            rewrapped += 1
    dropped = reencrypted = 0
    if store is not None:
        dropped = drop_cancelled_checkpoints(engine, store)
        reencrypted = reencrypt_checkpoints(engine, keyring, store)
    time.sleep(grace_seconds)
    with Session(engine) as session:
        used = kek_versions_in_use(session)
    retired, kept = [], []
    for version in provider.versions():
        if version == new_version:
            continue
        if version in used:
            kept.append(version)
        else:
            provider.retire_version(version)
            retired.append(version)
    return KekRotation(new_version, rewrapped, retired, kept, dropped, reencrypted)


@dataclass(frozen=True)
class DekRotation:
    tenant: str
    reencrypted: int


def rotate_dek(engine: Engine, keyring: Keyring, store: BlobStore, *, tenant: str) -> DekRotation:
    """A new data key for ``tenant``; its blobs re-encrypted; the old key destroyed.

    New ciphertexts go to new blob keys; the database switches rows and keys in one
    transaction; the old blobs are deleted after the commit. A failure before the commit
    leaves the old key and blobs as they were (and removes the new blobs).
    """
    written: list[str] = []
    old_blobs: list[str] = []
    try:
        with session_scope(engine) as session:
            row = session.exec(
                select(Tenant).where(Tenant.name == tenant, col(Tenant.deleted_at).is_(None))
            ).first()
            if row is None:
                raise NotFound(f"No tenant named {tenant!r}.")
            old_key, new_key = keyring.replace_data_key(session, row.id)
            versions = list(
                session.exec(select(ModelVersion).where(ModelVersion.tenant_id == row.id))
            )
            for mv in versions:
                blob = store.get(mv.blob_key)
                if hashlib.sha256(blob).hexdigest() != mv.sha256:
                    raise IntegrityError(
                        f"The stored blob of {mv.name} v{mv.version} does not match its SHA-256; "
                        "nothing was rotated."
                    )
                aad = model_aad(row.id, mv.name, mv.version)
                plaintext = crypto.decrypt(
                    old_key, blob, aad, what=f"model {mv.name} v{mv.version}"
                )
                fresh = crypto.encrypt(new_key, plaintext, aad)
                del plaintext
                new_blob_key = f"{row.id}/{mv.name}/v{mv.version}.{secrets.token_hex(4)}.ftx"
                store.put(new_blob_key, fresh)
                written.append(new_blob_key)
                old_blobs.append(mv.blob_key)
                mv.blob_key = new_blob_key
                mv.sha256 = hashlib.sha256(fresh).hexdigest()
                mv.size_bytes = len(fresh)
                session.add(mv)
            session.flush()
            record(session, Change(ChangeKind.data_key_rotated, row.id))
    except BaseException:
        for key in written:
            store.delete(key)
        raise
    for key in old_blobs:
        store.delete(key)
    return DekRotation(tenant, len(written))


@dataclass(frozen=True)
class TenantDeletion:
    tenant_id: str
    name: str
    revoked_keys: int
    destroyed_data_keys: int
    removed_blobs: int
    # SQLite: the write-ahead log was checkpointed and truncated after the shredding, so no
    # copy of the wrapped data key is left in the -wal file (always True elsewhere).
    log_truncated: bool = True


def delete_tenant(
    engine: Engine, keyring: Keyring, store: BlobStore, *, tenant_id: str
) -> TenantDeletion:
    """Crypto-shred a tenant: destroy its data key, remove its blobs, revoke its keys.

    The tenant row stays, marked deleted (``deleted_at``), so its privacy ledger (kept by
    ``privacy``, which has no foreign key to the tenant) still names whom it belonged to.
    The database commits first: once the wrapped data key is gone the blobs are
    unreadable, and removing the files afterwards cannot leave a readable half-state.

    The wrapped data key is overwritten with random bytes before its row is deleted. On
    SQLite (``secure_delete`` on) the freed space is zeroed and the write-ahead log is
    truncated after the commit, so the file holds no copy of it; on PostgreSQL the old row
    version stays in the table until VACUUM reuses its space and in backups and WAL
    archives (docs/SECURITY.md): retiring the KEK version that wrapped it is what makes
    those copies useless (``rotate_kek`` after the deletion).
    """
    now = utcnow()
    with session_scope(engine) as session:
        tenant = session.get(Tenant, tenant_id)
        if tenant is None or tenant.deleted_at is not None:
            raise NotFound("No such tenant.")
        revoked = 0
        for key in session.exec(select(ApiKey).where(ApiKey.tenant_id == tenant_id)):
            if key.revoked_at is None:
                key.revoked_at = now
                session.add(key)
                revoked += 1
        blobs = []
        for mv in session.exec(select(ModelVersion).where(ModelVersion.tenant_id == tenant_id)):
            blobs.append(mv.blob_key)
            session.delete(mv)
        # The checkpoint of a run this tenant took part in (a completed run's kept head, for
        # LP-FT, an interrupted or cancelled run's last round) was trained on its data too:
        # it goes with the tenant. A run still writing its checkpoints is left to its
        # worker (the API's deletion cancels such runs first).
        for run in session.exec(
            select(TrainingRun).where(
                col(TrainingRun.status).not_in(WRITING),
                col(TrainingRun.checkpoint_blob).is_not(None),
            )
        ):
            plans = json.loads(run.plans_json or "{}")
            named = json.loads(run.simulation_json or "{}").get("tenants") or []
            if tenant.name in named or any(p.get("tenant_id") == tenant_id for p in plans.values()):
                blobs.append(str(forget_checkpoint(run)))
                session.add(run)
        for row in session.exec(select(DataKey).where(DataKey.tenant_id == tenant_id)):
            row.wrapped = secrets.token_bytes(len(row.wrapped))  # overwritten, then deleted
            session.add(row)
        session.flush()
        destroyed = keyring.destroy_data_keys(session, tenant_id)
        forget_partners(session=session, tenant_id=tenant_id)
        tenant.deleted_at = now
        session.add(tenant)
        record(session, Change(ChangeKind.tenant_deleted, tenant_id))
        name = tenant.name
    for blob_key in blobs:
        store.delete(blob_key)
    truncated = checkpoint_wal(engine)
    return TenantDeletion(tenant_id, name, revoked, destroyed, len(blobs), truncated)


def deleted_tenants(session: Session) -> list[Tenant]:
    """Tenants that were deleted; their ledgers remain for auditors."""
    return list(
        session.exec(
            select(Tenant).where(col(Tenant.deleted_at).is_not(None)).order_by(Tenant.name)
        )
    )
