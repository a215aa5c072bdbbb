"""Served models: decrypt in memory on first use, keep an LRU of them per tenant/model/version."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from sqlmodel import Session

from models import ModelSpec, PublicTokenizer, build_model, load_tokenizer, load_weights
from tenancy.errors import NotFound
from tenancy.platform import Platform
from tenancy.registry import deployed_version, read_model_weights
from tenancy.tables import ModelVersion


class NotDeployed(NotFound):
    """The model exists but no version of it is deployed."""


@dataclass
class ServedModel:
    name: str
    version: int
    spec: ModelSpec
    model: torch.nn.Module
    tokenizer: PublicTokenizer

    @torch.no_grad()
    def predict(self, texts: list[str], top_k: int) -> list[list[tuple[str, float]]]:
        enc = self.tokenizer.encode(texts, self.spec.max_seq_len)
        probs = torch.softmax(self.model(enc.input_ids, enc.attention_mask), dim=-1)
        k = min(top_k, len(self.spec.labels))
        scores, idx = probs.topk(k, dim=-1)
        return [
            [(self.spec.labels[i], float(s)) for s, i in zip(row_s, row_i, strict=True)]
            for row_s, row_i in zip(scores.tolist(), idx.tolist(), strict=True)
        ]


class ModelCache:
    """LRU of decrypted models keyed by (tenant, name, version); plaintext only in memory."""

    def __init__(self, platform: Platform, capacity: int = 32) -> None:
        self.platform = platform
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, str, int], ServedModel] = OrderedDict()
        self._lock = threading.Lock()

    def _load(self, session: Session, row: ModelVersion) -> ServedModel:
        spec = ModelSpec.from_json(row.spec_json)
        weights = read_model_weights(
            session=session, keyring=self.platform.keyring, store=self.platform.store, row=row
        )
        model = load_weights(build_model(spec), weights).eval()
        return ServedModel(row.name, row.version, spec, model, load_tokenizer())

    def get_deployed(self, session: Session, tenant_id: str, name: str) -> ServedModel:
        row = deployed_version(session=session, tenant_id=tenant_id, name=name)
        if row is None:
            raise NotDeployed(f"Model {name!r} has no deployed version.")
        key = (tenant_id, name, row.version)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            served = self._load(session, row)
            self._items[key] = served
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
            return served

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
