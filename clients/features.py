"""A node's model inputs, computed once per (dataset, encoder) and reused.

For the encoder-head family the inputs are sentence vectors from the public encoder:
the only expensive step of training a head. They are computed the first time a dataset
is seen and reused for every round, local epoch, evaluation and the personalization.
They are derived from private text and stay on the node like the text: in this
process's memory, and, when the node's operator sets ``FEDTEXT_FEATURE_CACHE`` (a
directory on the node; a Deployment Engine node starts a new process per message), in
files only its user may read (0600). Never in a reply, never in a log.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from clients.data import LabeledData
from models import ModelSpec, text_inputs
from models.encoder_head import FAMILY as ENCODER_HEAD

log = logging.getLogger("fedtext.clients")

# Datasets kept in memory per process (train and test splits of a few tenants).
MEMORY_ENTRIES = 8


def _key(data: LabeledData, spec: ModelSpec) -> str:
    digest = hashlib.sha256()
    config = spec.family_config()
    # The runtime variant too: int8 vectors are not fp32's (models/runtimes.py).
    digest.update(
        f"{config.encoder_sha256}|{config.encoder_runtime}|{spec.max_seq_len}|{len(data)}|".encode()
    )
    for text in data.texts:
        raw = text.encode("utf-8", "surrogatepass")
        digest.update(len(raw).to_bytes(8, "big") + raw)  # length-prefixed: no two lists collide
    return digest.hexdigest()


class FeatureCache:
    """Sentence vectors of datasets, by (texts, encoder hash, runtime variant, max_seq_len)."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def vectors(
        self, data: LabeledData, spec: ModelSpec, device: torch.device | None = None
    ) -> torch.Tensor:
        key = _key(data, spec)
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                return self._memory[key]
        found = self._read(key, (len(data), spec.family_config().encoder_dim))
        if found is None:
            (found,) = text_inputs(spec, data.texts, device)
            self._write(key, found)
        with self._lock:
            self._memory[key] = found
            while len(self._memory) > MEMORY_ENTRIES:
                self._memory.popitem(last=False)
        return found

    def _path(self, key: str) -> Path | None:
        return self.directory / f"{key}.safetensors" if self.directory else None

    def _read(self, key: str, shape: tuple[int, int]) -> torch.Tensor | None:
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        try:
            vectors = load_file(str(path))["vectors"]
        except Exception:  # a torn or foreign file: recompute rather than fail the round
            return None
        return vectors if tuple(vectors.shape) == shape else None

    def _write(self, key: str, vectors: torch.Tensor) -> None:
        path = self._path(key)
        if path is None:
            return
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")  # 0600, unique
            os.close(fd)
            save_file({"vectors": vectors.contiguous()}, tmp)
            os.replace(tmp, path)
        except OSError as exc:  # a full or read-only disk: the round goes on from memory
            log.warning("feature cache not written: %s", type(exc).__name__)


_caches: dict[str | None, FeatureCache] = {}
_caches_lock = threading.Lock()


def feature_cache(directory: str | Path | None = None) -> FeatureCache:
    """The process's cache for ``directory``; by default ``FEDTEXT_FEATURE_CACHE`` (set by
    the node's operator, never by the coordinator), else memory only."""
    directory = directory or os.environ.get("FEDTEXT_FEATURE_CACHE") or None
    key = str(Path(directory).resolve()) if directory else None
    with _caches_lock:
        if key not in _caches:
            _caches[key] = FeatureCache(Path(key) if key else None)
        return _caches[key]


def model_inputs(
    data: LabeledData, spec: ModelSpec, *, device: torch.device | None = None
) -> tuple[torch.Tensor, ...]:
    """The forward inputs for ``data``: cached sentence vectors or fresh token ids."""
    if spec.family == ENCODER_HEAD:
        return (feature_cache().vectors(data, spec, device),)
    return text_inputs(spec, data.texts)
