"""Decisions on released metrics are not made on noise: seeded simulations over the real
decision functions (server.release.deploy_decision and released_metrics)."""

from __future__ import annotations

import json
import math
import random

from privacy.evaluation import confusion_counts
from privacy.uncertainty import DECISION_ERROR_RATE, released_uncertainty
from server.release import deploy_decision, released_metrics
from tenancy.tables import ModelVersion

SIGMA = 10.0


def _split(n: int, accuracy: float, rng: random.Random, k: int = 3) -> list[float]:
    truth = [t % k for t in range(n)]
    pred = [
        t if rng.random() < accuracy else rng.choice([c for c in range(k) if c != t]) for t in truth
    ]
    return confusion_counts(truth, pred, k)


def _release(counts: list[float], rng: random.Random) -> dict[str, float]:
    """One DP release of a confusion matrix (noise as privacy.evaluation adds it)."""
    return released_uncertainty([c + rng.gauss(0.0, SIGMA) for c in counts], 3, SIGMA)


def _serving(metrics: dict[str, object]) -> ModelVersion:
    return ModelVersion(
        tenant_id="t",
        name="m",
        version=1,
        spec_json="{}",
        sha256="0" * 64,
        blob_key="b",
        size_bytes=1,
        metrics_json=json.dumps(metrics),
        deployed=True,
    )


def _slack(draws: int) -> float:
    p = DECISION_ERROR_RATE
    return 3 * math.sqrt(p * (1 - p) / draws)


def test_if_better_between_equal_versions_deploys_at_most_the_error_rate() -> None:
    rng = random.Random(2026)
    exact = _split(300, 0.7, rng)  # both versions score the same on the same split
    draws, deployed, naive = 1200, 0, 0
    for _ in range(draws):
        old, _ = released_metrics(_release(exact, rng), None, trained_personal=False)
        new, _ = released_metrics(_release(exact, rng), None, trained_personal=False)
        deploy, why = deploy_decision("if-better", _serving(old), new)
        assert why["deployed"] == deploy and why["compared_with"] == 1
        assert why["error_rate"] == DECISION_ERROR_RATE and "held-out macro-F1" in why["reason"]
        deployed += deploy
        naive += new["macro_f1"] > old["macro_f1"]  # the rule before: deploy if higher
    assert deployed / draws <= DECISION_ERROR_RATE + _slack(draws)
    assert naive / draws > 0.4  # comparing the noised figures alone: a coin flip


def test_if_better_deploys_a_clearly_better_version() -> None:
    rng = random.Random(7)
    worse, better = _split(600, 0.55, rng), _split(600, 0.85, rng)
    deploys = 0
    for _ in range(200):
        old, _ = released_metrics(_release(worse, rng), None, trained_personal=False)
        new, _ = released_metrics(_release(better, rng), None, trained_personal=False)
        deploys += deploy_decision("if-better", _serving(old), new)[0]
    assert deploys >= 190


def test_version_without_recorded_uncertainty_waits_for_an_admin() -> None:
    rng = random.Random(1)
    new, _ = released_metrics(_release(_split(600, 0.9, rng), rng), None, trained_personal=False)
    deploy, why = deploy_decision("if-better", _serving({"macro_f1": 0.1}), new)
    assert not deploy and "no uncertainty" in why["reason"]
    deploy, why = deploy_decision("if-better", _serving({}), new)
    assert not deploy and "an admin deploys it" in why["reason"]


def test_personalized_model_is_kept_only_when_significantly_better() -> None:
    rng = random.Random(99)
    exact = _split(200, 0.6, rng)
    draws, chose_personal = 1200, 0
    for _ in range(draws):
        glob, pers = _release(exact, rng), _release(exact, rng)
        metrics, choice = released_metrics(glob, pers, trained_personal=True)
        chosen = choice["chosen"]
        chose_personal += chosen == "personalized"
        # The one metric: the figures of the model the version holds.
        source = pers if chosen == "personalized" else glob
        assert metrics["macro_f1"] == source["macro_f1"]
        assert metrics["accuracy_low"] == source["accuracy_low"]
        assert metrics["global_macro_f1"] == glob["macro_f1"]
        assert "same test split" in choice["reason"]
    assert chose_personal / draws <= DECISION_ERROR_RATE + _slack(draws)

    # Clearly better personalization is kept.
    better = _split(600, 0.9, rng)
    worse = _split(600, 0.5, rng)
    _, choice = released_metrics(_release(worse, rng), _release(better, rng), trained_personal=True)
    assert choice["chosen"] == "personalized"
    # No release to compare (eval-noise 0): the global model stays, and the choice says why.
    metrics, choice = released_metrics(None, None, trained_personal=True)
    assert choice["chosen"] == "global" and "eval-noise 0" in choice["reason"]
    assert metrics["accuracy"] is None and metrics["test_examples"] is None


def test_no_serving_version_is_first_only_when_no_version_was_ever_stored() -> None:
    """A deployed flag cleared around the platform (or a forged deployment, which is not
    served) must not let a partner's run deploy as if the tenant had no model yet."""
    metrics = {"macro_f1": 0.9, "macro_f1_sd": 0.01}
    for policy in ("first", "if-better"):
        assert deploy_decision(policy, None, metrics)[0] is True
        deploy, why = deploy_decision(policy, None, metrics, earlier_versions=True)
        assert not deploy and "an admin deploys it" in why["reason"]
    assert deploy_decision("always", None, metrics, earlier_versions=True)[0] is True
    assert deploy_decision("never", None, metrics)[0] is False
