"""Heads of many tenants on one shared encoder: batched across tenants, isolated, by bytes."""

from __future__ import annotations

import asyncio
import dataclasses
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient
from sqlmodel import Session

from models import ModelSpec, build_model, save_weights, text_inputs
from serving.app import create_app
from serving.config import ServingConfig
from serving.runtime.batching import InputRejected
from serving.runtime.model_cache import HEAD_OVERHEAD_BYTES, ModelCache, find_deployed
from serving.runtime.shared_encoder import (
    CrossTenantBatcher,
    EncoderRuntime,
    SharedEncoders,
    pick_device,
)
from tenancy.db import session_scope
from tenancy.platform import Platform
from tenancy.registry import store_model_version
from tests.factories import TenantFixture, make_tenant

LABELS = ["negative", "neutral", "positive"]
# Lengths differ a lot, so a mixed batch pads each sentence far beyond its own length.
TEXTS = {
    "acme": ["thanks for the upgrade, lovely crew", "ok"],
    "globex": ["lost my bag again and nobody at the desk would even look at the tracking number"],
    "initech": ["gate 12 at noon", "the \ud800 lone surrogate reads as a replacement character"],
}


def assert_same(got: list[list[float]], expected: list[list[float]]) -> None:
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-5, rtol=0)


def random_head(spec: ModelSpec) -> torch.nn.Module:
    model = build_model(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model.eval()


def store_head(
    platform: Platform, tenant: TenantFixture, seed: int, spec: ModelSpec | None = None
) -> torch.nn.Module:
    spec = spec or ModelSpec.create("encoder-head", LABELS)
    torch.manual_seed(seed)
    model = random_head(spec)
    with session_scope(platform.engine) as session:
        store_model_version(
            session=session, keyring=platform.keyring, store=platform.store,
            tenant=tenant.tenant, name="sentiment", spec_json=spec.to_json(),
            weights=save_weights(model), deploy=True,
        )  # fmt: skip
    return model


def test_mixed_tenant_batches_give_each_tenant_exactly_what_it_gets_alone(
    sqlite_platform: Platform,
) -> None:
    platform = sqlite_platform
    tenants = {name: make_tenant(platform, name) for name in TEXTS}
    models = {name: store_head(platform, t, seed=i) for i, (name, t) in enumerate(tenants.items())}
    batches: list[tuple[int, int]] = []
    executor = ThreadPoolExecutor(1)
    shared = SharedEncoders(
        executor=executor, device="cpu", max_batch=64, max_wait=0.05,
        on_batch=lambda inputs, requests: batches.append((inputs, requests)),
    )  # fmt: skip
    cache = ModelCache(platform, heads=shared)
    with Session(platform.engine) as session:
        served = {
            name: cache.get(session, find_deployed(session, t.tenant.id, "sentiment"))
            for name, t in tenants.items()
        }

    async def together() -> list[list[list[float]]]:
        return await asyncio.gather(*(served[n].predict_rows(TEXTS[n]) for n in TEXTS))

    async def alone(name: str) -> list[list[float]]:
        return await served[name].predict_rows(TEXTS[name])

    mixed = dict(zip(TEXTS, asyncio.run(together()), strict=True))
    assert batches == [(5, 3)]  # one encoder batch held all three tenants' requests
    for name, texts in TEXTS.items():
        single = asyncio.run(alone(name))
        assert batches[-1] == (len(texts), 1)
        assert_same(mixed[name], single)
        # ... and what the per-model path (features padded as in training) gives.
        spec = served[name].spec
        with torch.no_grad():
            expected = torch.softmax(models[name](*text_inputs(spec, texts)), -1).tolist()
        assert_same(mixed[name], expected)
    # Different heads really gave different answers on the shared features.
    differ = torch.tensor(served["acme"].infer(["ok"])) - torch.tensor(
        served["globex"].infer(["ok"])
    )
    assert differ.abs().max() > 1e-3
    executor.shutdown()


def test_heads_count_by_bytes_not_by_models_and_are_evicted_under_a_small_cache(
    sqlite_platform: Platform,
) -> None:
    platform = sqlite_platform
    tenants = [make_tenant(platform, f"t{i}") for i in range(4)]
    for i, t in enumerate(tenants):
        store_head(platform, t, seed=i)
    head_bytes = (384 * 3 + 3) * 4 + HEAD_OVERHEAD_BYTES
    executor = ThreadPoolExecutor(1)
    # Room for two heads by bytes; max_models=1 bounds whole models only.
    cache = ModelCache(
        platform, max_models=1, max_bytes=int(2.5 * head_bytes),
        heads=SharedEncoders(executor=executor, device="cpu"),
    )  # fmt: skip
    with Session(platform.engine) as session:
        rows = [find_deployed(session, t.tenant.id, "sentiment") for t in tenants]
        for row in rows[:2]:
            assert cache.get(session, row).shared
        assert cache.models == 0 and len(cache.cached_keys()) == 2  # both heads kept
        assert cache.nbytes == 2 * head_bytes
        cache.get(session, rows[0])  # t0 used again: t1 is now the least recently used
        cache.get(session, rows[2])
        cache.get(session, rows[3])
    kept = {key[0] for key in cache.cached_keys()}
    assert kept == {tenants[2].tenant.id, tenants[3].tenant.id}
    assert cache.nbytes == 2 * head_bytes
    assert cache.metrics.cache_evictions._value.get() == 2
    executor.shutdown()


def test_a_head_trained_on_another_encoder_is_refused_clearly(platform: Platform) -> None:
    acme = make_tenant(platform, "acme")
    spec = ModelSpec.create("encoder-head", LABELS)
    config = dict(spec.config, encoder_sha256="0" * 64)  # the same name, other files
    store_head(platform, acme, seed=0, spec=dataclasses.replace(spec, config=config))
    with TestClient(create_app(platform, ServingConfig(encoder_device="cpu"))) as client:
        r = client.post(
            "/v1/models/sentiment/predict", json={"inputs": ["hello"]}, headers=acme.predict
        )
        assert r.status_code == 500
        assert "not the one the model was trained with" in r.json()["detail"]
        assert client.app.state.cache.cached_keys() == []  # type: ignore[attr-defined]
    # The runtime's own reason names both hashes (what the operator's log gets).
    runtime = SharedEncoders(executor=ThreadPoolExecutor(1), device="cpu")
    with pytest.raises(ValueError, match=r"SHA-256 000000000000\.\.\..*has SHA-256"):
        runtime.batcher(ModelSpec.from_json(dataclasses.replace(spec, config=config).to_json()))


def test_shared_heads_over_http_keep_tenants_apart(platform: Platform) -> None:
    acme, globex = make_tenant(platform, "acme"), make_tenant(platform, "globex")
    acme_head = store_head(platform, acme, seed=1)
    store_head(platform, globex, seed=2)
    spec = ModelSpec.create("encoder-head", LABELS)
    with TestClient(create_app(platform, ServingConfig(encoder_device="cpu"))) as client:
        r = client.post(
            "/v1/models/sentiment/predict",
            json={"inputs": TEXTS["acme"], "top_k": 3},
            headers=acme.predict,
        )
        assert r.status_code == 200, r.text
        with torch.no_grad():
            expected = torch.softmax(acme_head(*text_inputs(spec, TEXTS["acme"])), -1)
        for row, probs in zip(r.json()["predictions"], expected, strict=True):
            got = {p["label"]: p["score"] for p in row}
            assert [got[label] for label in LABELS] == pytest.approx(probs.tolist(), abs=1e-5)
        # globex's key names acme's model name: it gets its own head, never acme's.
        other = client.post(
            "/v1/models/sentiment/predict",
            json={"inputs": TEXTS["acme"], "top_k": 3},
            headers=globex.predict,
        ).json()
        assert other["predictions"] != r.json()["predictions"]
        # A model only acme has is a 404 for globex, even with acme's head in memory.
        store_head(platform, acme, seed=3)  # v2 of acme's "sentiment"
        with session_scope(platform.engine) as session:
            spec_json = ModelSpec.create("encoder-head", LABELS).to_json()
            store_model_version(
                session=session, keyring=platform.keyring, store=platform.store,
                tenant=acme.tenant, name="private", spec_json=spec_json,
                weights=save_weights(acme_head), deploy=True,
            )  # fmt: skip
        ok = client.post(
            "/v1/models/private/predict", json={"inputs": ["hi"]}, headers=acme.predict
        )
        assert ok.status_code == 200
        r = client.post(
            "/v1/models/private/predict", json={"inputs": ["hi"]}, headers=globex.predict
        )
        assert r.status_code == 404


def test_the_encoder_device_defaults_to_cuda_when_there_is_one() -> None:
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="Unknown encoder device"):
        pick_device("tpu")
    with pytest.raises(ValueError, match="Unknown encoder precision"):
        SharedEncoders(executor=ThreadPoolExecutor(1), precision="fp8")


def test_reduced_precisions_approximate_fp32_and_never_mix_tenants_in_a_pass() -> None:
    from models import load_encoder

    encoder = load_encoder("minilm-l6")
    texts = [t for ts in TEXTS.values() for t in ts]
    exact = EncoderRuntime(encoder, "fp32").encode(texts, 128)
    # The runtime's vectors are ordinary tensors: a head can be trained on them.
    probe = torch.nn.Linear(exact.shape[1], 1)
    probe(exact).sum().backward()
    assert probe.weight.grad is not None
    torch.testing.assert_close(exact, encoder.encode(texts, 128), atol=1e-6, rtol=0)
    spec = ModelSpec.create("encoder-head", LABELS)
    torch.manual_seed(0)
    for precision, floor in (("int8", 0.75), ("bf16", 0.98)):
        runtime = EncoderRuntime(encoder, precision)
        assert not runtime.exact
        cosine = torch.nn.functional.cosine_similarity(runtime.encode(texts, 128), exact, dim=-1)
        assert cosine.min() > floor, (precision, cosine)
        # int8 scales activations per tensor: a pass's inputs share their rounding. Each
        # tenant gets its own pass, so its scores are what it gets alone, bit for bit.
        batcher = CrossTenantBatcher(
            runtime, executor=ThreadPoolExecutor(1), max_batch=64, max_wait=0.0
        )
        heads = {n: batcher.attach(random_head(spec), spec, n) for n in TEXTS}
        mixed = batcher.run_requests([(heads[n], TEXTS[n]) for n in TEXTS])
        for (name, texts_), rows in zip(TEXTS.items(), mixed, strict=True):
            assert rows == batcher.run_requests([(heads[name], texts_)])[0]


def test_a_head_trained_on_another_runtime_variant_is_refused_clearly(platform: Platform) -> None:
    acme = make_tenant(platform, "acme")
    # The same encoder files, vectors computed by torch fp32: not what an ONNX server runs.
    spec = ModelSpec.create("encoder-head", LABELS, encoder_runtime="torch-fp32")
    store_head(platform, acme, seed=0, spec=spec)
    config = ServingConfig(encoder_device="cpu", encoder_runtime="onnx-fp32")
    with TestClient(create_app(platform, config)) as client:
        r = client.post(
            "/v1/models/sentiment/predict", json={"inputs": ["hello"]}, headers=acme.predict
        )
        assert r.status_code == 500
        assert "runtime variant" in r.json()["detail"]
        assert client.app.state.cache.cached_keys() == []  # type: ignore[attr-defined]
    # The operator's reason names both variants; the same head is served on its own one.
    onnx = SharedEncoders(executor=ThreadPoolExecutor(1), runtime="onnx-fp32")
    with pytest.raises(ValueError, match=r"torch-fp32 runtime; this server .* onnx-fp32"):
        onnx.batcher(spec)
    torch_served = SharedEncoders(executor=ThreadPoolExecutor(1), runtime="torch-fp32")
    assert torch_served.batcher(spec).runtime.variant == "torch-fp32"
    # ... and the other way round.
    on_onnx = ModelSpec.create("encoder-head", LABELS, encoder_runtime="onnx-fp32")
    with pytest.raises(ValueError, match=r"onnx-fp32 runtime; this server .* torch-fp32"):
        torch_served.batcher(on_onnx)
    # A spec from before variants existed reads as torch-fp32.
    legacy = dict(spec.config)
    del legacy["encoder_runtime"]
    old = ModelSpec.from_json(dataclasses.replace(spec, config=legacy).to_json())
    assert old.family_config().encoder_runtime == "torch-fp32"
    with pytest.raises(ValueError, match="torch-fp32 runtime"):
        onnx.batcher(old)


def test_a_runtime_variant_that_failed_the_accuracy_gate_is_not_offered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import models.runtimes as runtimes

    for variant in runtimes.OFFERED:
        assert runtimes.ACCURACY_CHANGE[variant] >= runtimes.ACCURACY_GATE
    # Had int8 lost more than the gate allows, neither a server nor a run could choose it.
    monkeypatch.setitem(runtimes.ACCURACY_CHANGE, "onnx-int8", -0.006)
    monkeypatch.setattr(runtimes, "OFFERED", ("torch-fp32", "onnx-fp32"))
    monkeypatch.delenv(runtimes.ALLOW_UNGATED_ENV, raising=False)
    with pytest.raises(ValueError, match=r"not offered: heads trained on its vectors lost 0\.006"):
        SharedEncoders(executor=ThreadPoolExecutor(1), runtime="onnx-int8")
    with pytest.raises(ValueError, match="not offered"):
        ModelSpec.create("encoder-head", LABELS, encoder_runtime="onnx-int8")
    # ... unless the operator accepts the loss explicitly.
    monkeypatch.setenv(runtimes.ALLOW_UNGATED_ENV, "1")
    assert (
        SharedEncoders(executor=ThreadPoolExecutor(1), runtime="onnx-int8").runtime == "onnx-int8"
    )


@pytest.mark.parametrize("variant", ["onnx-fp32", "onnx-int8"])
def test_the_onnx_runtime_serves_the_vectors_a_node_trains_on_bit_for_bit(variant: str) -> None:
    from models.runtimes import load_runtime

    base = ModelSpec.create("encoder-head", LABELS, encoder_runtime="torch-fp32")
    # Built directly: a spec of a variant the gate does not offer (int8) for this check.
    spec = dataclasses.replace(base, config={**base.config, "encoder_runtime": variant})
    runtime = EncoderRuntime(load_runtime(variant=variant).encoder, "fp32", variant=variant)
    assert runtime.exact
    batcher = CrossTenantBatcher(runtime, executor=ThreadPoolExecutor(1), max_batch=64, max_wait=0)
    torch.manual_seed(0)
    heads = {n: batcher.attach(random_head(spec), spec, n) for n in TEXTS}
    mixed = batcher.run_requests([(heads[n], TEXTS[n]) for n in TEXTS])

    # Alone, in a mixed batch, and as a node computes them for training: int8 the same
    # bits (each sentence runs alone), fp32 the same to float rounding (padded groups).
    def check_same(got: list[list[float]], expected: list[list[float]]) -> None:
        if variant == "onnx-int8":
            assert got == expected
        else:
            assert_same(got, expected)

    for (name, texts), rows in zip(TEXTS.items(), mixed, strict=True):
        check_same(rows, batcher.run_requests([(heads[name], texts)])[0])
        with torch.no_grad():
            trained_on = torch.softmax(heads[name].head(*text_inputs(spec, texts)), -1)
        check_same(rows, trained_on.tolist())
    with pytest.raises(ValueError, match="applies to the torch-fp32 runtime only"):
        SharedEncoders(executor=ThreadPoolExecutor(1), runtime="onnx-fp32", precision="bf16")


def _int8_batcher(spec_variant: str = "onnx-int8") -> tuple[CrossTenantBatcher, ModelSpec]:
    from models.runtimes import load_runtime

    base = ModelSpec.create("encoder-head", LABELS, encoder_runtime="torch-fp32")
    spec = dataclasses.replace(base, config={**base.config, "encoder_runtime": spec_variant})
    runtime = EncoderRuntime(load_runtime(variant=spec_variant).encoder, variant=spec_variant)
    batcher = CrossTenantBatcher(runtime, executor=ThreadPoolExecutor(1), max_batch=64, max_wait=0)
    return batcher, spec


def test_an_input_the_encoder_refuses_fails_its_own_request_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    batcher, spec = _int8_batcher()
    encode = batcher.runtime.encode

    def refusing(texts: list[str], max_seq_len: int) -> torch.Tensor:
        # The tokenizer (a library) refusing one input: the only way a text fails here.
        if "refused" in texts:
            raise RuntimeError("tokenizer error")
        return encode(texts, max_seq_len)

    monkeypatch.setattr(batcher.runtime, "encode", refusing)
    torch.manual_seed(0)
    heads = {n: batcher.attach(random_head(spec), spec, n) for n in ("acme", "globex")}
    results = batcher.run_requests(
        [
            (heads["acme"], ["fine words", "refused", "more"]),
            (heads["globex"], ["refused"]),
            (heads["globex"], ["a good flight"]),
        ]
    )
    assert isinstance(results[0], InputRejected) and results[0].index == 1
    assert isinstance(results[1], InputRejected) and results[1].index == 0
    assert results[2] == batcher.run_requests([(heads["globex"], ["a good flight"])])[0]
