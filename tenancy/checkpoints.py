"""Run checkpoints at rest: their encryption, and their end (dropped or re-encrypted).

A checkpoint is the global model after a round, encrypted under a key derived from the
KEK (``Keyring.platform_key``), so it keeps a KEK version in use. One that nothing will
read again (its run was cancelled, or a tenant it was trained on was deleted) is dropped;
one that may still be read (a resumable run, a completed run's kept head) is re-encrypted
under the new KEK version by a rotation, so the old version can be retired and a backup
taken before the rotation no longer decrypts.
"""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from tenancy import crypto
from tenancy.blobs import BlobStore
from tenancy.db import session_scope
from tenancy.errors import IntegrityError
from tenancy.keyring import Keyring
from tenancy.tables import TrainingRun

PURPOSE = "checkpoint"
# Statuses (runs.status.RunStatus values) of a run whose worker may still write its
# checkpoint: a rotation leaves those to the worker (their version is reported as kept).
WRITING = ("created", "running")


def checkpoint_aad(run_id: str, server_round: int) -> bytes:
    return f"fedtext:checkpoint:{run_id}:r{server_round}".encode()


def encrypt_checkpoint(
    keyring: Keyring, run_id: str, server_round: int, weights: bytes
) -> tuple[int, bytes]:
    """(KEK version, encrypted blob) of ``weights`` under the current KEK version."""
    version, key = keyring.platform_key(PURPOSE)
    return version, crypto.encrypt(key, weights, checkpoint_aad(run_id, server_round))


def decrypt_checkpoint(keyring: Keyring, run: TrainingRun, blob: bytes) -> bytes:
    """The weights in ``blob`` (the run's checkpoint), integrity-checked and decrypted."""
    if not run.checkpoint_blob or run.checkpoint_kek_version is None:
        raise IntegrityError(f"Run {run.id} has no checkpoint to resume from.")
    if hashlib.sha256(blob).hexdigest() != run.checkpoint_sha256:
        raise IntegrityError(f"The checkpoint of run {run.id} does not match its SHA-256.")
    key = keyring.platform_key_version(PURPOSE, run.checkpoint_kek_version)
    return crypto.decrypt(
        key, blob, checkpoint_aad(run.id, run.checkpoint_round), what="checkpoint"
    )


def forget_checkpoint(run: TrainingRun) -> str | None:
    """Clear the run's checkpoint fields (caller adds and commits); the blob key to delete
    once committed, or None when it had none."""
    blob = run.checkpoint_blob
    run.checkpoint_blob = run.checkpoint_sha256 = None
    run.checkpoint_kek_version = None
    return blob


def drop_checkpoint(engine: Engine, store: BlobStore, run_id: str) -> bool:
    """Drop one run's checkpoint (its row first, then the blob); True if it had one."""
    with session_scope(engine) as session:
        run = session.exec(
            select(TrainingRun).where(TrainingRun.id == run_id).with_for_update()
        ).first()
        blob = forget_checkpoint(run) if run is not None else None
        if run is not None:
            session.add(run)
    if blob:
        store.delete(blob)
    return bool(blob)


def drop_cancelled_checkpoints(engine: Engine, store: BlobStore) -> int:
    """Drop the checkpoints of cancelled runs (a cancel is final: none is resumed)."""
    with Session(engine) as session:
        ids = list(
            session.exec(
                select(TrainingRun.id).where(
                    col(TrainingRun.cancelled_by).is_not(None),
                    col(TrainingRun.checkpoint_blob).is_not(None),
                )
            )
        )
    return sum(drop_checkpoint(engine, store, run_id) for run_id in ids)


def reencrypt_checkpoints(engine: Engine, keyring: Keyring, store: BlobStore) -> int:
    """Re-encrypt, under the current KEK version, the checkpoints of runs no worker writes.

    Each in its own transaction with the run's row locked: the new blob is written under a
    new key before the row names it, the old blob deleted after the commit.
    """
    version = keyring.provider.current_version()
    with Session(engine) as session:
        ids = list(
            session.exec(
                select(TrainingRun.id).where(
                    col(TrainingRun.checkpoint_blob).is_not(None),
                    col(TrainingRun.checkpoint_kek_version) != version,
                    col(TrainingRun.status).not_in(WRITING),
                )
            )
        )
    done = 0
    for run_id in ids:
        old: str | None = None
        with session_scope(engine) as session:
            run = session.exec(
                select(TrainingRun).where(TrainingRun.id == run_id).with_for_update()
            ).first()
            if (
                run is None
                or not run.checkpoint_blob
                or run.checkpoint_kek_version == version
                or run.status in WRITING
            ):
                continue  # changed meanwhile
            weights = decrypt_checkpoint(keyring, run, store.get(run.checkpoint_blob))
            new_version, blob = encrypt_checkpoint(keyring, run.id, run.checkpoint_round, weights)
            del weights
            key = f"runs/{run.id}/checkpoint-r{run.checkpoint_round}.{secrets.token_hex(4)}.ftx"
            store.put(key, blob)
            old = run.checkpoint_blob
            run.checkpoint_blob, run.checkpoint_kek_version = key, new_version
            run.checkpoint_sha256 = hashlib.sha256(blob).hexdigest()
            session.add(run)
        if old:
            store.delete(old)
            done += 1
    return done
