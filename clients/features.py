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
import os
import threading
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from clients.data import LabeledData
from models import ModelSpec, text_inputs
from models.encoder_head import FAMILY as ENCODER_HEAD

# Datasets kept in memory per process (train and test splits of a few tenants).
MEMORY_ENTRIES = 8


def _key(data: LabeledData, spec: ModelSpec) -> str:
    digest = hashlib.sha256()
    config = spec.family_config()
    digest.update(f"{config.encoder_sha256}\0{spec.max_seq_len}\0".encode())
    for text in data.texts:
        digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


class FeatureCache:
    """Sentence vectors of datasets, by (texts, encoder hash, max_seq_len)."""

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
        found = self._read(key)
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

    def _read(self, key: str) -> torch.Tensor | None:
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        try:
            return load_file(str(path))["vectors"]
        except Exception:  # a torn or foreign file: recompute rather than fail the round
            return None

    def _write(self, key: str, vectors: torch.Tensor) -> None:
        path = self._path(key)
        if path is None:
            return
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.close(fd)
        save_file({"vectors": vectors.contiguous()}, str(tmp))
        os.replace(tmp, path)


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
    data: LabeledData,
    spec: ModelSpec,
    *,
    device: torch.device | None = None,
    cache: FeatureCache | None = None,
) -> tuple[torch.Tensor, ...]:
    """The forward inputs for ``data``: cached sentence vectors or fresh token ids."""
    if spec.family == ENCODER_HEAD:
        return ((cache or feature_cache()).vectors(data, spec, device),)
    return text_inputs(spec, data.texts)
