"""Encrypted checkpoints of the global model after every round (never plaintext on disk)."""

from __future__ import annotations

import hashlib
import json

from runs.status import RunStatus
from tenancy import crypto
from tenancy.errors import IntegrityError
from tenancy.platform import Platform
from tenancy.tables import TrainingRun

PURPOSE = "checkpoint"


def _aad(run_id: str, server_round: int) -> bytes:
    return f"fedtext:checkpoint:{run_id}:r{server_round}".encode()


def save_checkpoint(
    platform: Platform, run: TrainingRun, server_round: int, weights: bytes
) -> None:
    """Encrypt ``weights`` under a KEK-derived key and record it on ``run`` (caller commits)."""
    version, key = platform.keyring.platform_key(PURPOSE)
    blob = crypto.encrypt(key, weights, _aad(run.id, server_round))
    blob_key = f"runs/{run.id}/checkpoint-r{server_round}.ftx"
    platform.store.put(blob_key, blob)
    previous = run.checkpoint_blob
    run.checkpoint_round = server_round
    run.checkpoint_blob = blob_key
    run.checkpoint_sha256 = hashlib.sha256(blob).hexdigest()
    run.checkpoint_kek_version = version
    if previous and previous != blob_key:
        platform.store.delete(previous)


def load_checkpoint(platform: Platform, run: TrainingRun) -> bytes:
    """The weights of the run's last checkpoint, integrity-checked and decrypted in memory."""
    if not run.checkpoint_blob or run.checkpoint_kek_version is None:
        raise IntegrityError(f"Run {run.id} has no checkpoint to resume from.")
    blob = platform.store.get(run.checkpoint_blob)
    if hashlib.sha256(blob).hexdigest() != run.checkpoint_sha256:
        raise IntegrityError(f"The checkpoint of run {run.id} does not match its SHA-256.")
    key = platform.keyring.platform_key_version(PURPOSE, run.checkpoint_kek_version)
    return crypto.decrypt(key, blob, _aad(run.id, run.checkpoint_round), what="checkpoint")


def final_global_weights(platform: Platform, run_id: str) -> tuple[dict[str, object], bytes]:
    """A completed run's stored configuration and the weights of its final global model.

    Kept only for encoder-head runs (a DP head, the start of LP-FT); ``ValueError`` with a
    message for the user when there is none.
    """
    from sqlmodel import Session

    with Session(platform.engine) as session:
        run = session.get(TrainingRun, run_id)
    if run is None or run.status != RunStatus.COMPLETED or not run.checkpoint_blob:
        raise ValueError(
            f"init-head-run {run_id!r}: no completed encoder-head run with its final global "
            "head kept under that id."
        )
    return json.loads(run.config_json), load_checkpoint(platform, run)
