"""Encrypted checkpoints of the global model after every round (never plaintext on disk)."""

from __future__ import annotations

import hashlib
import json

from runs.status import RunStatus
from tenancy.checkpoints import decrypt_checkpoint, encrypt_checkpoint
from tenancy.platform import Platform
from tenancy.tables import TrainingRun


def save_checkpoint(
    platform: Platform, run: TrainingRun, server_round: int, weights: bytes
) -> None:
    """Encrypt ``weights`` under a KEK-derived key and record it on ``run`` (caller commits)."""
    version, blob = encrypt_checkpoint(platform.keyring, run.id, server_round, weights)
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
    if not run.checkpoint_blob:
        return decrypt_checkpoint(platform.keyring, run, b"")  # raises: no checkpoint
    return decrypt_checkpoint(platform.keyring, run, platform.store.get(run.checkpoint_blob))


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
