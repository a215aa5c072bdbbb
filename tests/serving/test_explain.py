"""Explanations: completeness of integrated gradients, sentiment words on top, the routes.

Completeness (Sundararajan et al. 2017): the attributions of an input sum to the
explained score at the input minus at the baseline. Captum integrates numerically
(Gauss-Legendre, 64 steps here), so the sum may miss by a little: the stated tolerance is
|delta| <= 0.002 + 2% of |score - baseline_score| (probabilities), for every family.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient

from models import ModelSpec, build_model, save_weights, spec_encoder
from serving.app import create_app
from serving.config import ServingConfig
from serving.runtime.explain import INTEGRATED_GRADIENTS, OCCLUSION, explain
from serving.runtime.model_cache import run_batch
from serving.runtime.optimize import prepare_for_inference
from tenancy.db import session_scope
from tenancy.platform import Platform
from tenancy.registry import store_model_version
from tests.factories import TenantFixture, make_tenant, tiny_family_spec

LABELS = ["negative", "neutral", "positive"]


def tolerance(diff: float) -> float:
    return 0.002 + 0.02 * abs(diff)


# encoder-head: on a trained head, in test_the_most_attributed_word_... below.
@pytest.mark.parametrize("family", ["lstm", "transformer", "minilm"])
def test_attributions_sum_to_the_score_difference_they_explain(family: str) -> None:
    torch.manual_seed(11)
    spec = tiny_family_spec(family, max_seq_len=24)
    model = build_model(spec)
    with torch.no_grad():  # random weights large enough that words move the scores
        for name, p in model.named_parameters():
            # minilm: only its head (a random top layer saturates the softmax).
            if p.requires_grad and (family != "minilm" or name.startswith("head.")):
                p.normal_(0.0, 0.5)
    model = prepare_for_inference(model)
    texts = ["Thanks for the upgrade, LOVELY crew!! don't go", "unbelievably rude staff"]
    texts = texts[:1] if family == "minilm" else texts  # 22.7M parameters: one is enough
    served = run_batch(model, spec, texts)
    checked = 0
    for label in LABELS:
        for text, row, e in zip(
            texts, served, explain(model, spec, texts, label=label), strict=True
        ):
            assert e.method == INTEGRATED_GRADIENTS and e.label == label
            # The explained score is the one the predict path serves.
            assert e.score == pytest.approx(row[LABELS.index(label)], abs=1e-5)
            diff = e.score - e.baseline_score
            total = sum(t.attribution for t in e.tokens)
            assert abs(total - diff) <= tolerance(diff), (family, text, label, total, diff)
            assert e.delta == pytest.approx(total - diff)
            checked += abs(diff) > 0.02
    assert checked >= 2  # some differences the attributions had to add up to


def test_tokens_are_the_words_as_written_with_pieces_merged() -> None:
    spec = tiny_family_spec("lstm", max_seq_len=32)
    model = prepare_for_inference(build_model(spec))
    text = "Thanks for the upgrade, LOVELY crew!! don't: unbelievable"
    (e,) = explain(model, spec, [text])
    words = [t.token for t in e.tokens]
    assert words == ["Thanks", "for", "the", "upgrade", ",", "LOVELY", "crew", "!", "!",
                     "don't", ":", "unbelievable"]  # fmt: skip
    assert all(text[t.start : t.end] == t.token for t in e.tokens)
    assert not e.truncated
    (long,) = explain(prepare_for_inference(build_model(tiny_family_spec("lstm", 8))),
                      tiny_family_spec("lstm", 8), [text])  # fmt: skip
    assert long.truncated and [t.token for t in long.tokens] == words[:6]


# ------------------------------------------------------------------ a model that knows sentiment

POSITIVE = [
    "great service and a smooth landing", "what a lovely crew, thank you",
    "the staff were wonderful and kind", "excellent food on this flight",
    "amazing seats, I love this airline", "the new phone is fantastic",
    "best concert ever, so happy", "brilliant support, they fixed it fast",
    "delightful trip, superb views", "I really enjoyed the show, awesome",
]  # fmt: skip
NEGATIVE = [
    "the flight was late again and the staff was rude", "my bag was lost and nobody helps",
    "terrible service, worst airline ever", "the food was awful and cold",
    "horrible delay, I hate this", "the new phone is broken and useless",
    "disgusting seats and a miserable crew", "the support was pathetic and slow",
    "awful concert, so disappointed", "the app keeps crashing, annoying",
]  # fmt: skip
NEUTRAL = [
    "the meeting is on tuesday at noon", "the train leaves from platform four",
    "the flight departs at 6 pm", "the store opens on monday",
    "the concert starts at eight", "my phone has a blue case",
    "the gate changed to b12", "we land in denver tomorrow",
    "the airline flies to boston", "the update is version 2.1",
]  # fmt: skip
SENTIMENT_WORDS = {"wonderful", "terrible", "awful", "lovely", "great", "horrible", "excellent",
                   "amazing", "rude", "love", "hate", "fantastic", "worst", "best"}  # fmt: skip


def _trained_head(spec: ModelSpec) -> torch.nn.Module:
    """A non-private softmax head on MiniLM sentence vectors of the sentences above."""
    texts = [*NEGATIVE, *NEUTRAL, *POSITIVE]
    labels = torch.tensor([0] * 10 + [1] * 10 + [2] * 10)
    features = spec_encoder(spec).encode(texts, spec.max_seq_len)
    torch.manual_seed(0)
    model = build_model(spec)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(200):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(features), labels).backward()
        optimizer.step()
    return model


@pytest.fixture
def sentiment(sqlite_platform: Platform) -> Iterator[tuple[TestClient, TenantFixture]]:
    acme = make_tenant(sqlite_platform, "acme")
    spec = ModelSpec.create("encoder-head", LABELS)
    with session_scope(sqlite_platform.engine) as session:
        store_model_version(
            session=session, keyring=sqlite_platform.keyring, store=sqlite_platform.store,
            tenant=acme.tenant, name="sentiment", spec_json=spec.to_json(),
            weights=save_weights(_trained_head(spec)), deploy=True,
        )  # fmt: skip
    with TestClient(create_app(sqlite_platform, ServingConfig())) as client:
        yield client, acme


CLEAR = [
    ("The crew was wonderful", "positive", "wonderful"),
    ("What a terrible delay", "negative", "terrible"),
    ("Honestly the food was awful today", "negative", "awful"),
    ("Such a lovely flight to Denver", "positive", "lovely"),
]


def test_the_most_attributed_word_of_a_clear_sentence_is_its_sentiment_word(
    sentiment: tuple[TestClient, TenantFixture],
) -> None:
    client, acme = sentiment
    r = client.post(
        "/v1/models/sentiment/explain",
        json={"inputs": [text for text, _, _ in CLEAR]},
        headers=acme.predict,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "sentiment" and body["version"] == 1
    for (text, label, word), e in zip(CLEAR, body["explanations"], strict=True):
        assert e["label"] == label and e["method"] == INTEGRATED_GRADIENTS, e
        top = max(e["tokens"], key=lambda t: t["attribution"])
        assert top["token"] == word and top["token"].lower() in SENTIMENT_WORDS, (text, e)
        diff = e["score"] - e["baseline_score"]
        assert abs(e["delta"]) <= tolerance(diff) and diff > 0.2, e
    # Explaining another label: the sentiment word now counts against it.
    r = client.post(
        "/v1/models/sentiment/explain",
        json={"inputs": ["The crew was wonderful"], "label": "negative"},
        headers=acme.predict,
    )
    (e,) = r.json()["explanations"]
    assert e["label"] == "negative"
    assert min(e["tokens"], key=lambda t: t["attribution"])["token"] == "wonderful"


def test_predict_with_explain_adds_explanations_on_every_lane(
    sentiment: tuple[TestClient, TenantFixture],
) -> None:
    client, acme = sentiment
    plain = client.post(
        "/v1/models/sentiment/predict", json={"inputs": ["lovely crew"]}, headers=acme.predict
    )
    assert plain.status_code == 200 and "explanations" not in plain.json()
    for _ in range(2):  # the model is warm now: the fast lane must hand these to the route
        r = client.post(
            "/v1/models/sentiment/predict",
            json={"inputs": ["The crew was wonderful", "What a terrible delay"], "explain": True},
            headers=acme.predict,
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert [p[0]["label"] for p in body["predictions"]] == ["positive", "negative"]
        assert [e["label"] for e in body["explanations"]] == ["positive", "negative"]
        assert body["explanations"][0]["score"] == pytest.approx(
            body["predictions"][0][0]["score"], abs=1e-5
        )


def test_explain_refuses_like_predict_and_names_bad_labels(
    sentiment: tuple[TestClient, TenantFixture], sqlite_platform: Platform
) -> None:
    client, acme = sentiment
    globex = make_tenant(sqlite_platform, "globex")
    url = "/v1/models/sentiment/explain"
    assert client.post(url, json={"inputs": ["hi"]}).status_code == 401
    other = client.post(url, json={"inputs": ["hi"]}, headers=globex.predict)
    missing = client.post(
        "/v1/models/nosuch/explain", json={"inputs": ["hi"]}, headers=globex.predict
    )
    assert other.status_code == missing.status_code == 404  # acme's model is not globex's
    assert other.json()["detail"].replace("sentiment", "X") == missing.json()["detail"].replace(
        "nosuch", "X"
    )
    r = client.post(url, json={"inputs": ["hi"], "label": "angry"}, headers=acme.predict)
    assert r.status_code == 422 and "Unknown label 'angry'" in r.json()["detail"]
    r = client.post(url, json={"inputs": ["  "]}, headers=acme.predict)
    assert r.status_code == 422 and "is empty" in r.json()["detail"]
    assert client.post(url, json={"inputs": ["hi"] * 17}, headers=acme.predict).status_code == 422
    r = client.post(url, json={"inputs": ["hi"] * 16, "steps": 128}, headers=acme.predict)
    assert r.status_code == 422 and "inputs x steps is at most 1024" in r.text
    r = client.post(
        "/v1/models/sentiment/predict",
        json={"inputs": ["hi"] * 17, "explain": True},
        headers=acme.predict,
    )
    assert r.status_code == 422 and "at most 16 inputs" in r.json()["detail"]


def test_an_int8_model_is_explained_by_occlusion(
    sentiment: tuple[TestClient, TenantFixture],
) -> None:
    client, acme = sentiment
    r = client.put(
        "/v1/models/sentiment/versions/1/serving",
        json={"quantize": "dynamic-int8"},
        headers=acme.admin,
    )
    assert r.status_code == 200, r.text
    r = client.post(
        "/v1/models/sentiment/explain",
        json={"inputs": ["The crew was wonderful"]},
        headers=acme.predict,
    )
    (e,) = r.json()["explanations"]
    assert e["method"] == OCCLUSION and e["label"] == "positive"
    assert max(e["tokens"], key=lambda t: t["attribution"])["token"] == "wonderful"


def test_a_tenant_waits_behind_at_most_one_explanation_of_its_own(
    sentiment: tuple[TestClient, TenantFixture],
) -> None:
    """A second explanation of the same tenant while one runs is a 429, not a queue that
    makes every other tenant wait behind it; the slot is free again once it is answered."""
    client, acme = sentiment
    body = {"inputs": ["The crew was wonderful", "What a terrible delay"], "steps": 512}
    url = "/v1/models/sentiment/explain"
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.post, url, json=body, headers=acme.predict)
        deadline = time.monotonic() + 30
        while not getattr(client.app.state, "explain_tenants", None):  # type: ignore[attr-defined]
            assert time.monotonic() < deadline and not first.done(), "never started"
            time.sleep(0.005)
        second = client.post(url, json={"inputs": ["hi"], "steps": 8}, headers=acme.predict)
        assert second.status_code == 429, second.text
        assert "already has an explanation" in second.json()["detail"]
        assert second.headers["retry-after"] == "1"
        assert first.result().status_code == 200
    again = client.post(url, json={"inputs": ["hi"], "steps": 8}, headers=acme.predict)
    assert again.status_code == 200, again.text
