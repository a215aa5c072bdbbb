"""Factories for tenants, keys, models and data used across tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clients.data import DEMO_LABELS, LabeledData
from models import ModelSpec, build_model, save_weights
from tenancy.db import session_scope
from tenancy.platform import Platform
from tenancy.registry import store_model_version
from tenancy.tables import ModelVersion, Tenant
from tenancy.tenants import Scope, create_api_key, create_tenant, set_partners

TINY_LSTM = {"proj_dim": 8, "hidden_dim": 8, "dropout": 0.0}


@dataclass
class TenantFixture:
    tenant: Tenant
    admin_key: str
    predict_key: str

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"}

    @property
    def predict(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.predict_key}"}


def make_tenant(platform: Platform, name: str, budget_epsilon: float = 10.0) -> TenantFixture:
    with session_scope(platform.engine) as session:
        tenant = create_tenant(
            session=session, keyring=platform.keyring, name=name, budget_epsilon=budget_epsilon
        )
        _, admin = create_api_key(session=session, tenant=tenant, scopes=[Scope.admin])
        _, predict = create_api_key(session=session, tenant=tenant, scopes=[Scope.predict])
    return TenantFixture(tenant, admin, predict)


def agree(platform: Platform, tenant: TenantFixture, *partners: str) -> None:
    """``tenant`` lets ``partners`` start runs that include it (PUT /v1/partners)."""
    with session_scope(platform.engine) as session:
        set_partners(session=session, tenant=tenant.tenant, names=partners)


def tiny_spec(max_seq_len: int = 16) -> ModelSpec:
    return ModelSpec.create("lstm", list(DEMO_LABELS), max_seq_len=max_seq_len, **TINY_LSTM)


def store_tiny_model(
    platform: Platform, tenant: Tenant, name: str = "lstm", deploy: bool = True, seed: int = 0
) -> ModelVersion:
    torch.manual_seed(seed)
    spec = tiny_spec()
    weights = save_weights(build_model(spec))
    with session_scope(platform.engine) as session:
        return store_model_version(
            session=session,
            keyring=platform.keyring,
            store=platform.store,
            tenant=tenant,
            name=name,
            spec_json=spec.to_json(),
            weights=weights,
            deploy=deploy,
        )


SENTENCES = [
    ("the flight was late again and the staff was rude", "negative"),
    ("what a lovely crew, thank you for the upgrade", "positive"),
    ("the meeting is on tuesday at noon", "neutral"),
    ("my bag was lost and nobody helps", "negative"),
    ("great service and a smooth landing", "positive"),
    ("the train leaves from platform four", "neutral"),
]


def toy_data(n: int) -> LabeledData:
    """``n`` labelled sentences, distinct by an index so none is a substring of another."""
    texts, labels = [], []
    for i in range(n):
        text, label = SENTENCES[i % len(SENTENCES)]
        texts.append(f"{text} (note {i:04d})")
        labels.append(DEMO_LABELS.index(label))
    return LabeledData(tuple(texts), tuple(labels), DEMO_LABELS)


TINY_FAMILIES: dict[str, dict[str, object]] = {
    "encoder-head": {},  # the head is tiny already; the encoder is the shipped MiniLM
    "lstm": TINY_LSTM,
    "transformer": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
    "minilm": {"trainable_layers": 1},
}


def tiny_family_spec(family: str, max_seq_len: int = 16) -> ModelSpec:
    return ModelSpec.create(
        family, list(DEMO_LABELS), max_seq_len=max_seq_len, **TINY_FAMILIES[family]
    )
