"""The encoder runtime variants in process: speed, closeness to torch fp32, accuracy gate.

A helper of bench/serving.py (not a benchmark itself). For each variant of
models/runtimes.py: sentences per second on the test tweets (requests of 64, as the
server's batches; the served variant's number is the serving limit), cosine of its
vectors to torch fp32's, and the accuracy gate: a softmax head trained (non-private, the
same seed and steps) on the variant's vectors of the training tweets, scored on the test
tweets encoded by the same variant; ``accuracy_change`` is its macro-F1 minus torch
fp32's (``accuracy_change_sd``: its paired-bootstrap SD over the test tweets, the gate's
own noise). A variant passes when the change is at least ``models.runtimes.ACCURACY_GATE``.
"""

from __future__ import annotations

import sys
import time
from typing import Any


def _log(msg: str) -> None:
    print(f"[bench/encoders] {msg}", file=sys.stderr, flush=True)


def macro_f1(predicted: list[int], truth: list[int], classes: int) -> float:
    """Unweighted mean of the per-class F1 scores."""
    scores = []
    for c in range(classes):
        tp = sum(1 for p, t in zip(predicted, truth, strict=True) if p == c and t == c)
        fp = sum(1 for p, t in zip(predicted, truth, strict=True) if p == c and t != c)
        fn = sum(1 for p, t in zip(predicted, truth, strict=True) if p != c and t == c)
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / classes


def change_sd(
    predicted: list[int], reference: list[int], truth: list[int], classes: int, draws: int = 200
) -> float:
    """The gate's own noise: SD of (macro-F1 of ``predicted`` minus ``reference``'s) over
    paired bootstrap resamples of the test tweets (seeded)."""
    import numpy as np

    rng = np.random.default_rng(0)
    p, r, t = np.array(predicted), np.array(reference), np.array(truth)

    def f1(pred: np.ndarray, true: np.ndarray) -> float:
        scores = []
        for c in range(classes):
            tp = np.sum((pred == c) & (true == c))
            wrong = np.sum((pred == c) != (true == c))
            scores.append(2 * tp / (2 * tp + wrong) if tp else 0.0)
        return float(np.mean(scores))

    diffs = []
    for _ in range(draws):
        i = rng.integers(0, len(t), len(t))
        diffs.append(f1(p[i], t[i]) - f1(r[i], t[i]))
    return float(np.std(diffs))


def train_head(features: Any, labels: list[int], variant: str, steps: int = 300) -> Any:
    """Softmax regression on ``features`` (non-private; deterministic): (spec, head)."""
    import torch

    from clients.data import DEMO_LABELS
    from models import ModelSpec, build_model

    torch.manual_seed(0)
    base = ModelSpec.create("encoder-head", list(DEMO_LABELS), encoder_runtime="torch-fp32")
    # Built directly (not through ModelSpec.create), so that a variant the gate refuses
    # can still be measured.
    spec = ModelSpec(
        family=base.family, labels=base.labels, max_seq_len=base.max_seq_len,
        config={**base.config, "encoder_runtime": variant},
    )  # fmt: skip
    model = build_model(spec).train()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    y = torch.tensor(labels)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(features), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return spec, model.eval()


def variant_report(
    train_texts: list[str],
    train_labels: list[int],
    test_texts: list[str],
    test_labels: list[int],
    variants: tuple[str, ...],
) -> dict[str, Any]:
    """Per variant: pps (requests of 64), min/mean cosine to torch-fp32, macro-F1, the gate.

    Also returns the heads (``heads[variant] = (spec, module)``) for the serving runs.
    """
    import torch

    from models.runtimes import ACCURACY_GATE, LEGACY_RUNTIME, load_runtime

    torch.set_num_threads(1)  # as the server's forward thread runs torch
    order = (LEGACY_RUNTIME, *[v for v in variants if v != LEGACY_RUNTIME])
    report: dict[str, Any] = {}
    heads: dict[str, Any] = {}
    vectors: dict[str, Any] = {}
    predictions: dict[str, list[int]] = {}
    for variant in order:
        runtime = load_runtime(variant=variant)
        runtime.encode(test_texts[:16], 128)  # warm-up (and the export, the first time)
        started = time.perf_counter()
        train_vectors = runtime.encode(train_texts, 128)
        train_s = time.perf_counter() - started
        started = time.perf_counter()
        parts = [runtime.encode(test_texts[i : i + 64], 128) for i in range(0, len(test_texts), 64)]
        pps = len(test_texts) / (time.perf_counter() - started)
        vectors[variant] = torch.cat(parts)
        spec, head = train_head(train_vectors, train_labels, variant)
        heads[variant] = (spec, head)
        with torch.no_grad():
            predicted = head(vectors[variant]).argmax(-1).tolist()
        f1 = macro_f1(predicted, test_labels, len(spec.labels))
        predictions[variant] = predicted
        cosine = torch.nn.functional.cosine_similarity(vectors[variant], vectors[LEGACY_RUNTIME])
        change = f1 - report.get(LEGACY_RUNTIME, {"macro_f1": f1})["macro_f1"]
        report[variant] = {
            "pps_requests_of_64": round(pps, 1),
            "train_encode_pps": round(len(train_texts) / train_s, 1),
            "macro_f1": round(f1, 4),
            "accuracy": round(
                sum(p == t for p, t in zip(predicted, test_labels, strict=True)) / len(test_labels),
                4,
            ),
            "accuracy_change": round(change, 4),
            "accuracy_change_sd": round(
                change_sd(predicted, predictions[LEGACY_RUNTIME], test_labels, len(spec.labels)),
                4,
            ),
            "gate_passed": change >= ACCURACY_GATE,
            "min_cosine_to_torch_fp32": round(cosine.min().item(), 4),
            "mean_cosine_to_torch_fp32": round(cosine.mean().item(), 4),
            "batch_independent": runtime.exact,
        }
        _log(f"{variant}: {report[variant]}")
    report["settings"] = {
        "train_examples": len(train_texts),
        "test_examples": len(test_texts),
        "head": "softmax regression, Adam lr 0.05, 300 full-batch steps, seed 0, no DP",
        "gate": ACCURACY_GATE,
    }
    return {"report": report, "heads": heads}


if __name__ == "__main__":  # the gate alone: python bench/_encoders.py [train] [test]
    import json
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from clients.data import load_demo_corpus, train_test_split
    from models.runtimes import RUNTIMES

    n_train = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    n_test = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    wanted = tuple(sys.argv[3].split(",")) if len(sys.argv) > 3 else RUNTIMES
    train, test = train_test_split(load_demo_corpus(), test_fraction=0.1, seed=0)
    found = variant_report(
        list(train.texts)[:n_train], list(train.labels)[:n_train],
        list(test.texts)[:n_test], list(test.labels)[:n_test], wanted,
    )  # fmt: skip
    print(json.dumps(found["report"]))
