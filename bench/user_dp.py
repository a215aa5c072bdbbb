"""User-level DP (privacy-unit user) against example-level DP at the same epsilon.

    .venv/bin/python bench/user_dp.py --quick     # 600 train / 200 test tweets per tenant
    .venv/bin/python bench/user_dp.py             # full size: every tweet of the corpus

The public tweet corpus on the `topic` partition (six tenants, each mostly one source
topic), its tweets grouped into synthetic users: each tenant's rows are shuffled and cut
into users of 1 to 40 tweets, sizes skewed (a discretized Pareto, shape 1.2: most users
write a few tweets, a few write up to 40). Held-out rows are whole users
(``train_test_split`` by user). The encoder-head family with its defaults (20 rounds, one
local epoch, learning rate 0.05, batch sized by the data), each tenant planned by
``server.planning.plan_tenant`` (the platform's planner and accountant), trained with the
platform's client code (``train_dp``: example; ``train_dp_users``: user, k =
``--max-examples-per-user``) and averaged by FedAvg weighted by each tenant's planning
count, in-process (no Flower, no ledger: the utility of the mechanism, not the
platform's overhead; no personalization: the global model is scored).

Rows: example-level and user-level at epsilon 8 and 3; the central references without DP
on the pooled training rows (TF-IDF + logistic regression, and the encoder head); all
scored on every tenant's held-out users, pooled macro-F1. ``gap_eps8`` = example-level
minus user-level macro-F1 at epsilon 8 (goal: at most 0.03). A tenant whose plan is
refused (too few users for the epsilon) is left out of that row's federation and named.

The last line printed is one JSON object (keys: JSON_KEYS).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

TENANTS = ("acme", "globex", "initech", "umbrella", "hooli", "stark")
EPSILONS = (8.0, 3.0)
MAX_TWEETS_PER_USER = 40
# The JSON line's keys (tests/test_bench_smoke.py checks them on --smoke).
JSON_KEYS = {
    "results": None, "gap_eps8": None, "goal_met": None, "users": None,
    "train_per_tenant": None, "max_examples_per_user": None, "load_average": None,
    "seconds": None, "mode": None,
}  # fmt: skip


def encode_each_text_once() -> None:
    """Sentence vectors per distinct tweet, computed once in this process.

    The platform caches vectors per dataset (a node sees one), but this bench forms many
    datasets of the same tweets (each tenant's rows, its rows bounded to k per user, the
    pooled central set): without this every tweet was encoded about 2.4 times, the
    bench's main cost at full size. Deterministic encoder, so the vectors are the same.
    """
    import clients.features as features

    original = features.text_inputs
    memo: dict[str, torch.Tensor] = {}

    def text_inputs(spec: Any, texts: Any, device: Any = None) -> tuple[torch.Tensor, ...]:
        if spec.family != "encoder-head":
            return original(spec, texts, device)
        todo = list(dict.fromkeys(t for t in texts if t not in memo))
        for at in range(0, len(todo), 512):  # in slices: progress survives in the memo
            chunk = todo[at : at + 512]
            (vectors,) = original(spec, chunk, device)
            memo.update(zip(chunk, vectors, strict=True))
        return (torch.stack([memo[t] for t in texts]),)

    features.text_inputs = text_inputs  # type: ignore[assignment]


def user_sizes(n: int, rng: random.Random) -> list[int]:
    """Sizes of users covering ``n`` rows: 1..40 each, skewed (Pareto, shape 1.2)."""
    sizes: list[int] = []
    while sum(sizes) < n:
        sizes.append(min(MAX_TWEETS_PER_USER, int(rng.paretovariate(1.2))))
    sizes[-1] -= sum(sizes) - n
    return [s for s in sizes if s > 0]


def with_users(data: Any, tenant: str, seed: int) -> Any:
    from clients.data import LabeledData

    rng = random.Random(f"{seed}-{tenant}")
    order = list(range(len(data)))
    rng.shuffle(order)
    users: list[str] = [""] * len(data)
    at = 0
    for u, size in enumerate(user_sizes(len(data), rng)):
        for i in order[at : at + size]:
            users[i] = f"{tenant}-u{u:05d}"
        at += size
    return LabeledData(data.texts, data.labels, data.label_names, tuple(users))


def tenant_parts(max_train: int, max_test: int, seed: int) -> list[tuple[str, Any, Any]]:
    """Each tenant's (name, train, test): topic shares of the corpus, users assigned, split
    by whole users, then capped by user (whole users kept) at the sizes asked."""
    from clients.data import load_demo_corpus, partition, train_test_split

    corpus = load_demo_corpus()
    shares = partition(corpus, "topic", len(TENANTS), seed)
    out = []
    for name, idx in zip(TENANTS, shares, strict=True):
        data = with_users(corpus.subset(idx), name, seed)
        train, test = train_test_split(data, 0.2, seed)
        out.append((name, cap(train, max_train), cap(test, max_test)))
    return out


def cap(data: Any, limit: int) -> Any:
    """Whole users, in order of first row, while their rows fit in ``limit`` (0: all)."""
    if not limit or len(data) <= limit:
        return data
    kept: set[str] = set()
    count: dict[str, int] = {}
    for u in data.users:
        count[u] = count.get(u, 0) + 1
    total = 0
    for u in dict.fromkeys(data.users):
        if total + count[u] > limit:
            continue  # a large user that does not fit; smaller ones may
        kept.add(u)
        total += count[u]
    return data.subset([i for i, u in enumerate(data.users) if u in kept])


@torch.no_grad()
def predict(model: torch.nn.Module, data: Any, spec: Any) -> np.ndarray:
    from clients.train import encode

    model.eval()
    *inputs, _ = encode(data, spec).tensors
    return model(*inputs).argmax(-1).numpy()


def pooled_f1(pairs: list[tuple[np.ndarray, Any]]) -> float:
    from clients.evaluate import macro_f1

    y_pred = np.concatenate([p for p, _ in pairs])
    y_true = np.concatenate([np.array(d.labels) for _, d in pairs])
    return round(macro_f1(y_true, y_pred, len(pairs[0][1].label_names)), 4)


def federated(
    unit: str,
    eps: float,
    parts: list[tuple[str, Any, Any]],
    k: int,
    rounds: int,
    small_batches: bool = False,
) -> dict[str, Any]:
    """FedAvg over the tenants whose plan fits, each trained by the platform's DP code.

    ``small_batches``: the DP-FedAvg-style alternative (Ponomareva et al. 2023 list it
    for user-level): 1/40 of the units per expected batch (at least 16), so 4x the steps
    of the planner's 1/10, at 4x the learning rate; measured beside the planner's choice.
    """
    from clients.data import DEMO_LABELS, bound_users
    from clients.train import train_dp, train_dp_users
    from models import ModelSpec, build_model, load_model_state, model_state, training_defaults
    from privacy.accounting import compose_epsilon
    from server.planning import PlanRefused, plan_tenant

    defaults = training_defaults("encoder-head")
    spec = ModelSpec.create("encoder-head", list(DEMO_LABELS))
    plans, refused, batch = {}, [], {}
    learning_rate = defaults.learning_rate * (4 if small_batches else 1)
    for name, train, _ in parts:
        n = train.num_users() if unit == "user" else len(train)
        batch[name] = max(min(16, n), n // 40) if small_batches else defaults.batch_size
        try:
            plans[name] = plan_tenant(
                tenant_id=name, tenant_name=name, node_id=0, num_train=n, num_test=0,
                target_epsilon=eps, delta=1e-5, clip_norm=1.0,
                batch_size=batch[name], local_epochs=defaults.local_epochs,
                rounds=rounds, budget_epsilon=100.0, spent_events=[],
                privacy_unit=unit, max_examples_per_user=k,
            )  # fmt: skip
        except PlanRefused as exc:
            refused.append(f"{name}: {exc}")
    torch.manual_seed(7)
    global_model = build_model(spec)
    left_out = {name: bound_users(t, k)[1] for name, t, _ in parts} if unit == "user" else {}
    for _ in range(rounds):
        states, weights = [], []
        for name, train, _ in parts:
            if name not in plans:
                continue
            plan = plans[name]
            local = build_model(spec)
            load_model_state(local, model_state(global_model))
            fit: dict[str, Any] = {"batch_size": batch[name], "epochs": defaults.local_epochs,
                   "learning_rate": learning_rate, "secure_mode": False}  # fmt: skip
            if unit == "user":
                train_dp_users(local, train, spec, plan.round_params, max_examples_per_user=k,
                               **fit)  # fmt: skip
            else:
                train_dp(local, train, spec, plan.round_params, **fit)
            states.append(model_state(local))
            weights.append(plan.num_train)
        if not states:
            break
        total = sum(weights)
        load_model_state(global_model, {
            key: sum(s[key] * (w / total) for s, w in zip(states, weights, strict=True))
            for key in states[0]
        })  # fmt: skip
    accounted = {
        name: round(compose_epsilon([plan.round_params] * rounds, 1e-5), 3)
        for name, plan in plans.items()
    }
    f1 = pooled_f1([(predict(global_model, test, spec), test) for _, _, test in parts])
    return {
        "training": "federated", "privacy_unit": unit, "epsilon": eps, "macro_f1": f1,
        "schedule": "small-batches" if small_batches else "planner",
        "learning_rate": learning_rate,
        "steps": {n: p.round_params.steps * rounds for n, p in plans.items()},
        "accounted_epsilon": accounted,
        "noise_multiplier": {n: round(p.round_params.noise_multiplier, 3)
                             for n, p in plans.items()},
        "sample_rate": {n: round(p.round_params.sample_rate, 4) for n, p in plans.items()},
        "rows_left_out_by_k": left_out, "refused": refused,
    }  # fmt: skip


def central(parts: list[tuple[str, Any, Any]]) -> list[dict[str, Any]]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from clients.data import DEMO_LABELS, LabeledData
    from clients.train import train_plain
    from models import ModelSpec, build_model

    train = LabeledData(
        tuple(t for _, p, _ in parts for t in p.texts),
        tuple(y for _, p, _ in parts for y in p.labels),
        DEMO_LABELS,
    )
    tests = [t for _, _, t in parts]
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    clf = LogisticRegression(max_iter=2000, C=4.0)
    clf.fit(vec.fit_transform(train.texts), train.labels)
    tfidf = pooled_f1([(clf.predict(vec.transform(t.texts)), t) for t in tests])
    spec = ModelSpec.create("encoder-head", list(DEMO_LABELS))
    torch.manual_seed(7)
    model = build_model(spec)
    train_plain(model, train, spec, batch_size=64, epochs=30, learning_rate=0.01)
    head = pooled_f1([(predict(model, t, spec), t) for t in tests])
    return [
        {"training": "central", "model": "tfidf_logreg", "epsilon": None, "macro_f1": tfidf},
        {"training": "central", "model": "encoder-head", "epsilon": None, "macro_f1": head},
    ]


def progress(results: list[dict[str, Any]], started: float) -> None:
    """Each row as it finishes (stderr): a long run read before it ends."""
    r = results[-1]
    print(
        f"[{time.monotonic() - started:.0f} s, load {os.getloadavg()[0]:.1f}] "
        f"{r['training']} {r.get('privacy_unit', r.get('model'))} {r.get('schedule', '')} "
        f"eps {r['epsilon']}: macro-F1 {r['macro_f1']}",
        file=sys.stderr,
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="600 train / 200 test per tenant")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes (make test): 40/16 rows, 2 rounds"
    )
    parser.add_argument("--max-examples-per-user", type=int, default=8, help="k")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    max_train, max_test, rounds = {"smoke": (40, 16, 2), "quick": (600, 200, 20),
                                   "full": (0, 0, 20)}[mode]  # fmt: skip
    k = args.max_examples_per_user
    started = time.monotonic()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FEDTEXT_FEATURE_CACHE"] = str(Path(tmp) / "features")
        encode_each_text_once()
        parts = tenant_parts(max_train, max_test, seed=7)
        results = central(parts)
        progress(results, started)
        epsilons = EPSILONS if mode != "smoke" else (8.0,)
        for eps in epsilons:
            for unit in ("example", "user"):
                results.append(federated(unit, eps, parts, k, rounds))
                progress(results, started)
            if eps == 8.0 and mode != "smoke":
                results.append(federated("user", eps, parts, k, rounds, small_batches=True))
                progress(results, started)
    fed = {
        (r.get("privacy_unit"), r["epsilon"]): r["macro_f1"]
        for r in results
        if r.get("schedule", "planner") == "planner"
    }
    gap = None
    if ("example", 8.0) in fed and ("user", 8.0) in fed:
        gap = round(fed[("example", 8.0)] - fed[("user", 8.0)], 4)
    out = {
        "results": results,
        "gap_eps8": gap,
        "goal_met": None if gap is None else gap <= 0.03,
        "users": {n: t.num_users() for n, t, _ in parts},
        "train_per_tenant": {n: len(t) for n, t, _ in parts},
        "max_examples_per_user": k,
        "load_average": [round(x, 1) for x in (*load, *os.getloadavg())],
        "seconds": round(time.monotonic() - started, 1),
        "mode": mode,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
