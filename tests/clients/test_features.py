"""Sentence vectors: computed once per (dataset, encoder) on a node, kept on the node."""

from __future__ import annotations

import stat
from pathlib import Path

import torch

from clients.data import LabeledData
from clients.evaluate import evaluate
from clients.features import FeatureCache, feature_cache, model_inputs
from clients.train import train_dp, train_plain
from models import ModelSpec, build_model, load_encoder
from privacy.params import DPParams, dp_batch_size, poisson_schedule
from tests.factories import toy_data


def head_spec() -> ModelSpec:
    return ModelSpec.create("encoder-head", ["negative", "neutral", "positive"])


def fresh(n: int, tag: str) -> LabeledData:
    """Toy data no other test encodes (the process-wide cache would hide the count)."""
    data = toy_data(n)
    return LabeledData(tuple(f"{tag}: {t}" for t in data.texts), data.labels, data.label_names)


def test_vectors_are_computed_once_per_dataset_for_every_round_and_evaluation() -> None:
    spec = head_spec()
    train, test = fresh(48, "count-train"), fresh(13, "count-test")
    encoder = load_encoder()
    before = encoder.texts_encoded
    model = build_model(spec)
    rate, steps = poisson_schedule(len(train), 16, 2)
    for _ in range(3):  # three rounds, two local epochs each, then an evaluation
        train_dp(
            model, train, spec, DPParams(1.0, rate, steps, 1.0, 1e-3),
            batch_size=16, epochs=2, learning_rate=0.05, secure_mode=False,
        )  # fmt: skip
        evaluate(model, test, spec)
    train_plain(model, train, spec, batch_size=16, epochs=1, learning_rate=0.05)
    assert encoder.texts_encoded - before == len(train) + len(test)


def test_disk_cache_is_private_to_the_node_user_and_reused_by_a_new_process(
    tmp_path: Path,
) -> None:
    spec, data = head_spec(), fresh(10, "disk")
    first = FeatureCache(tmp_path / "features")
    vectors = first.vectors(data, spec)
    files = list((tmp_path / "features").iterdir())
    assert len(files) == 1
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "features").stat().st_mode) == 0o700
    encoder = load_encoder()
    before = encoder.texts_encoded
    again = FeatureCache(tmp_path / "features").vectors(data, spec)  # as a new process would
    assert encoder.texts_encoded == before
    assert torch.equal(vectors, again)


def test_the_cache_key_covers_the_texts_and_the_spec() -> None:
    spec = head_spec()
    cache = feature_cache(None)
    a = cache.vectors(toy_data(6), spec)
    b = cache.vectors(toy_data(7), spec)
    assert a.shape == (6, 384) and b.shape == (7, 384)
    longer = ModelSpec.create("encoder-head", list(spec.labels), max_seq_len=8)
    (short_inputs,) = model_inputs(toy_data(6), longer)
    assert not torch.equal(short_inputs, a)  # truncated to 8 tokens: other vectors


def test_lists_that_join_to_the_same_bytes_do_not_share_vectors() -> None:
    spec = head_spec()
    cache = FeatureCache(None)
    joined = LabeledData(("good\0bad",), (0,), spec.labels)
    split = LabeledData(("good", "bad"), (0, 2), spec.labels)
    assert cache.vectors(split, spec).shape == (2, 384)
    assert cache.vectors(joined, spec).shape == (1, 384)


def test_a_cache_file_of_the_wrong_shape_is_not_trusted(tmp_path: Path) -> None:
    spec, data = head_spec(), fresh(4, "shape")
    cache = FeatureCache(tmp_path)
    cache.vectors(data, spec)
    (path,) = tmp_path.iterdir()
    from safetensors.torch import save_file

    save_file({"vectors": torch.zeros(3, 384)}, str(path))  # planted: one row short
    assert FeatureCache(tmp_path).vectors(data, spec).shape == (4, 384)


def test_auto_batch_is_a_tenth_of_the_data_within_bounds() -> None:
    assert dp_batch_size(3000, 0) == 300
    assert dp_batch_size(100, 0) == 64
    assert dp_batch_size(40, 0) == 40
    assert dp_batch_size(50_000, 0) == 1024
    assert dp_batch_size(3000, 128) == 128
