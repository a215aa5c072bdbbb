"""Utility of DP federated training against non-private and central references.

Six tenants on the `topic` partition of the demo corpus, the `lstm` family:
federated DP models at epsilon 1, 3 and 8 (through the real platform: Flower's
Simulation Engine, Opacus, ledger, personalization), federated without DP (the same
client code and FedAvg weighting, in-process, no noise), and on the pooled data a
TF-IDF + logistic regression model and the same LSTM trained centrally without DP.
Every model is scored on the pooled held-out test splits of the six tenants.

Prints one JSON object as its last line: {"results": [...], ...}.
Usage: python bench/accuracy.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

TENANTS = [f"t{i}" for i in range(1, 7)]


def pooled(parts: list[Any]) -> Any:
    from clients.data import LabeledData

    return LabeledData(
        tuple(t for p in parts for t in p.texts),
        tuple(y for p in parts for y in p.labels),
        parts[0].label_names,
    )


def tenant_data(cfg: dict[str, Any]) -> list[Any]:
    from clients.data import DEMO_LABELS
    from clients.local_data import resolve_node_data

    return [
        resolve_node_data(
            {"partition-id": i, "num-partitions": len(TENANTS)},
            {**cfg, "tenants": ",".join(TENANTS)},
            DEMO_LABELS,
        )
        for i in range(len(TENANTS))
    ]


def score(model: torch.nn.Module, test: Any, spec: Any) -> dict[str, float]:
    from clients.train import evaluate

    r = evaluate(model, test, spec)
    return {"accuracy": r.accuracy, "macro_f1": r.macro_f1}


def row(
    training: str, model: str, eps: float | None, stage: str, m: dict[str, float]
) -> dict[str, Any]:
    return {"training": training, "model": model, "epsilon": eps, "stage": stage, **m}


def federated_dp(eps: float, sim: dict[str, Any], workdir: Path) -> list[dict[str, Any]]:
    from fedtext.platform import platform_from_settings, upgrade_schema
    from fedtext.settings import Settings
    from fedtext.simulation import SimulationConfig, simulate
    from tenancy.db import session_scope
    from tenancy.tenants import create_tenant

    platform = platform_from_settings(Settings(data_dir=workdir / f"eps{eps:g}"))
    upgrade_schema(platform)
    with session_scope(platform.engine) as session:
        for name in TENANTS:
            create_tenant(session=session, keyring=platform.keyring, name=name, budget_epsilon=100)
    result = simulate(
        platform, SimulationConfig(tenants=TENANTS, epsilon=eps, secure_mode=False, **sim)
    )
    # Each tenant scores the global model and its personalized one on its own held-out
    # split; pooling weights by test examples gives the score on the pooled test split.
    tenants = result.summary["tenants"]
    n = sum(t["test_examples"] for t in tenants.values())
    glob = {
        "accuracy": sum(t["global_accuracy"] * t["test_examples"] for t in tenants.values()) / n,
        "macro_f1": sum(t["global_macro_f1"] * t["test_examples"] for t in tenants.values()) / n,
    }
    pers = {
        "accuracy": sum(t["personalized_accuracy"] * t["test_examples"] for t in tenants.values())
        / n,
        "macro_f1": sum(t["personalized_macro_f1"] * t["test_examples"] for t in tenants.values())
        / n,
    }
    return [
        row("federated", "lstm", eps, "global", glob),
        row("federated", "lstm", eps, "personalized", pers),
    ]


def federated_plain(
    parts: list[Any], spec: Any, rounds: int, lr: float, test: Any, local_epochs: int
) -> list[dict[str, Any]]:
    from clients.train import train_plain
    from models import build_model, load_model_state, model_state

    torch.manual_seed(7)
    global_model = build_model(spec)
    for _ in range(rounds):
        states, weights = [], []
        for part in parts:
            local = build_model(spec)
            load_model_state(local, model_state(global_model))
            train_plain(
                local, part.train, spec, batch_size=64, epochs=local_epochs, learning_rate=lr
            )
            states.append(model_state(local))
            weights.append(len(part.train))
        total = sum(weights)
        avg = {
            k: sum(s[k] * (w / total) for s, w in zip(states, weights, strict=True))
            for k in states[0]
        }
        load_model_state(global_model, avg)
    glob = score(global_model, test, spec)
    per = []
    for part in parts:
        local = build_model(spec)
        load_model_state(local, model_state(global_model))
        train_plain(local, part.train, spec, batch_size=64, epochs=1, learning_rate=lr)
        per.append((score(local, part.test, spec), len(part.test)))
    n = sum(k for _, k in per)
    pers = {m: sum(s[m] * k for s, k in per) / n for m in ("accuracy", "macro_f1")}
    return [
        row("federated", "lstm", None, "global", glob),
        row("federated", "lstm", None, "personalized", pers),
    ]


def central(train: Any, test: Any, spec: Any, epochs: int, lr: float) -> list[dict[str, Any]]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    from clients.train import train_plain
    from models import build_model

    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    clf = LogisticRegression(max_iter=2000, C=4.0)
    clf.fit(vec.fit_transform(train.texts), train.labels)
    pred = clf.predict(vec.transform(test.texts))
    tfidf = {
        "accuracy": float(accuracy_score(test.labels, pred)),
        "macro_f1": float(f1_score(test.labels, pred, average="macro")),
    }
    torch.manual_seed(7)
    model = build_model(spec)
    train_plain(model, train, spec, batch_size=64, epochs=epochs, learning_rate=lr)
    return [
        row("central", "tfidf_logreg", None, "global", tfidf),
        row("central", "lstm", None, "global", score(model, test, spec)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small data, fewer rounds")
    parser.add_argument(
        "--local-epochs",
        type=int,
        default=3,
        help="local epochs per round (1 left the federated models near the majority class)",
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    from clients.data import DEMO_LABELS
    from models import ModelSpec

    size = (600, 200, 3) if args.quick else (3000, 600, 5)
    max_train, max_test, rounds = size
    lr = 0.01
    data_cfg = {
        "partitioning": "topic",
        "max-train-examples": max_train,
        "max-test-examples": max_test,
        "seed": 7,
    }
    parts = tenant_data(data_cfg)
    train, test = pooled([p.train for p in parts]), pooled([p.test for p in parts])
    spec = ModelSpec.create("lstm", list(DEMO_LABELS))
    started = time.monotonic()
    results = central(train, test, spec, epochs=rounds, lr=lr)
    results += federated_plain(parts, spec, rounds, lr, test, args.local_epochs)
    sim = {
        "rounds": rounds,
        "partitioning": "topic",
        "max_train_examples": max_train,
        "max_test_examples": max_test,
        "learning_rate": lr,
        "local_epochs": args.local_epochs,
        "personalize_epochs": 1,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for eps in (1.0, 3.0, 8.0):
            results += federated_dp(eps, sim, Path(tmp))
    out = {
        "results": results,
        "tenants": len(TENANTS),
        "partitioning": "topic",
        "train_per_tenant": max_train,
        "test_per_tenant": max_test,
        "rounds": rounds,
        "local_epochs": args.local_epochs,
        "delta": 1e-5,
        "seconds": round(time.monotonic() - started, 1),
        "notes": "federated without DP runs the same client code in-process (no Flower); "
        "DP rows go through the platform (Flower simulation, Opacus, ledger)",
    }
    print(json.dumps(out))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
