"""Encoder runtime variants: close to torch fp32, reproducible export, part of the spec."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models import ModelSpec, load_encoder
from models.runtimes import (
    DEFAULT_RUNTIME,
    OFFERED,
    GroupedRuntime,
    OnnxRuntime,
    OpenVinoRuntime,
    check_runtime,
    export_graph,
    load_runtime,
    usable_cores,
)

# Fixed sentences: tweets' topics and lengths, an emoji, a one-letter input, a long one.
SENTENCES = [
    "I love this airline, the crew was wonderful and the seats were comfy!",
    "Flight delayed three hours and nobody at the gate would tell us anything.",
    "Apple announced a new phone today.",
    "ok",
    "🙂 thanks @united",
    "the self-driving car stopped at every light, " * 6,
]
# Stated closeness to torch fp32 per sentence (cosine): fp32 graphs are the same math;
# int8 MatMul weights per channel measured 0.97-0.995 on tweets (dynamic); the static
# recipe's on the 1,000 gate tweets: mean 0.988, min 0.974 (docs/BENCHMARKS.md, issue 26).
# Static int8 on these six: 0.944 ("ok": three tokens) to 0.992, mean 0.981; OpenVINO
# on the same graph: 0.944 to 0.992, mean 0.981.
MIN_COSINE = {"onnx-fp32": 0.99999, "onnx-int8": 0.96, "onnx-int8-static": 0.94,
              "openvino-int8-static": 0.94}  # fmt: skip
MEAN_COSINE = {"onnx-fp32": 0.99999, "onnx-int8": 0.985, "onnx-int8-static": 0.975,
               "openvino-int8-static": 0.975}  # fmt: skip
# A sentence alone vs in a padded group: the grouped variants' fp32 parts round
# differently with the group's width; static int8's fixed scales keep it at that
# (OpenVINO measured 0.0 here; the same bound is stated for both int8 engines).
ALONE_VS_GROUP_ATOL = {"onnx-fp32": 1e-6, "onnx-int8-static": 1e-5, "openvino-int8-static": 1e-5}
VARIANTS = ["onnx-fp32", "onnx-int8", "onnx-int8-static", "openvino-int8-static"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_onnx_variants_match_torch_fp32_within_the_stated_cosine(variant: str) -> None:
    reference = load_runtime(variant="torch-fp32").encode(SENTENCES, 128)
    got = load_runtime(variant=variant).encode(SENTENCES, 128)
    assert got.shape == reference.shape and got.dtype == torch.float32
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5)
    cosine = torch.nn.functional.cosine_similarity(got, reference, dim=-1)
    assert cosine.min() >= MIN_COSINE[variant], cosine
    assert cosine.mean() >= MEAN_COSINE[variant], cosine
    # A sentence's vector is its own: alone, or among others, the same (int8: the same
    # bits, each sentence runs alone; grouped variants: equal to float rounding).
    alone = torch.cat([load_runtime(variant=variant).encode([s], 128) for s in SENTENCES])
    if variant == "onnx-int8":
        assert torch.equal(alone, got)
    else:
        torch.testing.assert_close(alone, got, atol=ALONE_VS_GROUP_ATOL[variant], rtol=0)


@pytest.mark.parametrize("variant", ["onnx-int8-static", "openvino-int8-static"])
def test_static_int8_is_batch_independent_in_length_sorted_padded_groups(variant: str) -> None:
    """Another tenant's sentence in the same padded group does not move a vector: the
    activation scales are fixed at export, and padding is masked (in either engine)."""
    runtime = load_runtime(variant=variant)
    assert isinstance(runtime, GroupedRuntime) and runtime.group > 1
    mine = SENTENCES[2]
    # Neighbours of every length, so that ``mine`` is padded in some groups and sets the
    # width in others; a long outlier would have set a dynamic scale for all of them.
    others = [SENTENCES[0], "x " * 60, "ok", SENTENCES[5] * 3, "🙂" * 40, SENTENCES[1]]
    alone = runtime.encode([mine], 128)[0]
    for k in range(1, len(others) + 1):
        with_others = runtime.encode([*others[:k], mine], 128)[-1]
        torch.testing.assert_close(with_others, alone, atol=1e-5, rtol=0)
        cosine = torch.nn.functional.cosine_similarity(with_others, alone, dim=0)
        assert cosine >= 0.99999


def test_openvino_runs_the_static_int8_graph_deterministically_on_parallel_requests() -> None:
    """openvino-int8-static is onnx-int8-static's graph file (same export, same encoder
    hash) run by OpenVINO: the same vectors run to run, with one or several requests at
    once, and close to ONNX Runtime's on the same graph (not its bits: its own variant)."""
    encoder = load_encoder()
    runtime = load_runtime(variant="openvino-int8-static")
    assert isinstance(runtime, OpenVinoRuntime)
    assert runtime.graph == load_runtime(variant="onnx-int8-static").graph  # type: ignore[attr-defined]
    assert runtime.sha256 == encoder.sha256
    # Enough sentences for every worker to run groups at once, twice each way.
    texts = [f"{s} #{i}" for i in range(12) for s in SENTENCES]
    first = runtime.encode(texts, 128)
    assert torch.equal(runtime.encode(texts, 128), first)
    serial = OpenVinoRuntime(encoder, workers=1)
    assert torch.equal(serial.encode(texts, 128), first)
    ort = load_runtime(variant="onnx-int8-static").encode(SENTENCES, 128)
    cosine = torch.nn.functional.cosine_similarity(runtime.encode(SENTENCES, 128), ort)
    assert cosine.min() >= 0.98, cosine  # measured 0.987 to 1.0000 on these six


def test_openvino_runs_few_input_shapes_and_the_padding_does_not_move_vectors() -> None:
    """OpenVINO keeps buffers per input shape (unbounded growth with every new one): the
    groups are padded to bucketed shapes, masked, and the vectors stay the sentence's own."""
    runtime = OpenVinoRuntime(load_encoder(), workers=1)
    seen: list[tuple[int, ...]] = []
    request = runtime._requests[0]

    class Recording:
        def infer(self, feed: dict[str, np.ndarray]) -> object:
            seen.append(feed["input_ids"].shape)
            return request.infer(feed)

    runtime._requests = [Recording()]  # type: ignore[list-item]
    texts = [" ".join(["word"] * (1 + i % 37)) + f" {i}" for i in range(60)]
    vectors = [runtime.encode(texts[:n], 128) for n in (1, 3, 5, 17, 60)]
    assert all(r & (r - 1) == 0 and w % runtime.WIDTH_STEP == 0 for r, w in seen), seen
    alone = torch.cat([runtime.encode([t], 128) for t in texts[:17]])
    torch.testing.assert_close(vectors[3], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(vectors[4][:17], alone, atol=1e-5, rtol=0)
    assert torch.isfinite(vectors[2]).all()


def test_the_export_is_reproducible_offline_and_checked_on_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder = load_encoder()
    first = export_graph(encoder, "onnx-int8", tmp_path / "a")
    second = export_graph(encoder, "onnx-int8", tmp_path / "b")
    assert first.read_bytes() == second.read_bytes()  # same files in, same graph out
    record = json.loads(first.with_suffix(".json").read_text())
    assert record["encoder_sha256"] == encoder.sha256
    assert record["variant"] == "onnx-int8"
    # A torn or altered graph no longer matches its record: it is exported again.
    first.write_bytes(first.read_bytes()[:1000])
    again = export_graph(encoder, "onnx-int8", tmp_path / "a")
    assert again.read_bytes() == second.read_bytes()
    # The graph runs as the cached one does.
    runtime = OnnxRuntime(encoder, "onnx-int8", directory=tmp_path / "b", workers=1)
    expected = load_runtime(variant="onnx-int8").encode(SENTENCES[:3], 128)
    assert torch.equal(runtime.encode(SENTENCES[:3], 128), expected)


def test_the_static_int8_export_and_its_calibration_are_reproducible_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Calibrated on public tweets at export, offline: the same graph bytes twice."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder = load_encoder()
    first = export_graph(encoder, "onnx-int8-static", tmp_path / "a")
    second = export_graph(encoder, "onnx-int8-static", tmp_path / "b")
    assert first.read_bytes() == second.read_bytes()
    record = json.loads(first.with_suffix(".json").read_text())
    assert record["variant"] == "onnx-int8-static"
    assert record["recipe"]["calibration_sentences"] > 0
    # The cached graph (tests above) is this recipe's: it gives the same vectors.
    runtime = OnnxRuntime(encoder, "onnx-int8-static", directory=tmp_path / "a", workers=1)
    expected = load_runtime(variant="onnx-int8-static").encode(SENTENCES, 128)
    assert torch.equal(runtime.encode(SENTENCES, 128), expected)


def test_the_runtime_variant_is_part_of_the_encoder_identity_in_the_spec() -> None:
    spec = ModelSpec.create("encoder-head", ["negative", "neutral", "positive"])
    assert spec.family_config().encoder_runtime == DEFAULT_RUNTIME
    on_torch, on_onnx = (
        ModelSpec.create("encoder-head", ["negative", "neutral", "positive"], encoder_runtime=v)
        for v in ("torch-fp32", "onnx-fp32")
    )
    assert on_torch.family_config().encoder_sha256 == on_onnx.family_config().encoder_sha256
    assert on_torch.sha256() != on_onnx.sha256()  # same files, other vectors: another spec
    with pytest.raises(ValueError, match="Unknown encoder runtime 'onnx-fp8'"):
        ModelSpec.create("encoder-head", ["a", "b"], encoder_runtime="onnx-fp8")
    with pytest.raises(ValueError, match="Unknown encoder_runtime"):
        ModelSpec.from_json(spec.to_json().replace(f'"{DEFAULT_RUNTIME}"', '"x"'))
    assert DEFAULT_RUNTIME in OFFERED
    for variant in OFFERED:
        assert check_runtime(variant) == variant


def test_usable_cores_follow_the_affinity_and_a_numeric_omp_num_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Ray node gets OMP_NUM_THREADS=its CPU share: its encoder runs that many groups."""
    import os

    affinity = len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert usable_cores() == affinity
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert usable_cores() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "not-a-number")
    assert usable_cores() == affinity
    monkeypatch.setenv("OMP_NUM_THREADS", str(affinity + 8))
    assert usable_cores() == affinity


def test_the_settings_name_every_runtime_variant() -> None:
    """FEDTEXT_SERVE_ENCODER_RUNTIME accepts exactly the variants models/runtimes.py has
    (settings spell them out to stay torch-free)."""
    from typing import get_args

    from fedtext.settings import EncoderRuntimeName
    from models.runtimes import RUNTIMES

    assert set(get_args(EncoderRuntimeName)) == set(RUNTIMES)


def test_a_variant_that_missed_the_gate_is_refused_unless_the_operator_accepts_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """openvino-int8-static measured -0.0092 macro-F1 (gate -0.005): loadable (a node
    follows the spec it is sent), not offered for new specs or servers by default."""
    from models.runtimes import ACCURACY_CHANGE, ACCURACY_GATE, ALLOW_UNGATED_ENV

    assert ACCURACY_CHANGE["openvino-int8-static"] < ACCURACY_GATE
    assert "openvino-int8-static" not in OFFERED
    monkeypatch.delenv(ALLOW_UNGATED_ENV, raising=False)
    with pytest.raises(ValueError, match=r"not offered: heads trained on its vectors lost 0\.00"):
        check_runtime("openvino-int8-static")
    monkeypatch.setenv(ALLOW_UNGATED_ENV, "1")
    assert check_runtime("openvino-int8-static") == "openvino-int8-static"
