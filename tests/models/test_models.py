from __future__ import annotations

import pytest
import torch

from models import (
    ModelSpec,
    build_model,
    load_model_state,
    load_tokenizer,
    load_weights,
    model_state,
    save_weights,
)
from tests.factories import TINY_LSTM, tiny_spec


def test_tokenizer_uses_the_public_minilm_vocabulary() -> None:
    tok = load_tokenizer()
    assert tok.vocab_size == 30522
    enc = tok.encode(["hello world"], max_len=6)
    # [CLS]=101 hello=7592 world=2088 [SEP]=102 in BERT's uncased WordPiece vocabulary.
    assert enc.input_ids.tolist() == [[101, 7592, 2088, 102, 0, 0]]
    assert enc.attention_mask.tolist() == [[1, 1, 1, 1, 0, 0]]


def test_tokenizer_truncates_but_keeps_sep() -> None:
    enc = load_tokenizer().encode(["one two three four five six seven"], max_len=5)
    assert enc.input_ids.shape == (1, 5)
    assert enc.input_ids[0, 0].item() == 101 and enc.input_ids[0, -1].item() == 102
    assert enc.attention_mask.sum().item() == 5


def test_forward_gives_one_logit_per_class() -> None:
    spec = tiny_spec()
    enc = load_tokenizer().encode(["good", "bad day", "meh"], spec.max_seq_len)
    logits = build_model(spec)(enc.input_ids, enc.attention_mask)
    assert logits.shape == (3, 3)
    assert torch.isfinite(logits).all()


def test_padding_does_not_change_the_prediction() -> None:
    spec = tiny_spec(max_seq_len=32)
    model = build_model(spec).eval()
    tok = load_tokenizer()
    short = tok.encode(["a short sentence"], 8)
    long = tok.encode(["a short sentence"], 32)
    with torch.no_grad():
        a = model(short.input_ids, short.attention_mask)
        b = model(long.input_ids, long.attention_mask)
    # Forward direction and pooling ignore padding; the reverse LSTM starts at the pads,
    # so allow a small difference only.
    assert torch.allclose(a.softmax(-1), b.softmax(-1), atol=0.05)


def test_spec_round_trips_through_json_and_rebuilds_the_same_model() -> None:
    spec = tiny_spec()
    again = ModelSpec.from_json(spec.to_json())
    assert again == spec and again.sha256() == spec.sha256()
    torch.manual_seed(1)
    model = build_model(spec).eval()
    rebuilt = load_weights(build_model(again), save_weights(model)).eval()
    enc = load_tokenizer().encode(["same answer please"], spec.max_seq_len)
    with torch.no_grad():
        assert torch.equal(
            model(enc.input_ids, enc.attention_mask), rebuilt(enc.input_ids, enc.attention_mask)
        )


def test_frozen_public_embedding_is_never_part_of_the_weights() -> None:
    model = build_model(tiny_spec())
    state = model_state(model)
    assert not any("embedding" in k for k in state)
    assert sum(v.numel() for v in state.values()) < 100_000
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"family": "gpt", "labels": ["a", "b"]}', "Unknown model family 'gpt'"),
        ('{"family": "lstm", "labels": ["a"]}', "at least two distinct"),
        ('{"family": "lstm", "labels": ["a", "b"], "config": {"hidden_dim": -1}}', "hidden_dim"),
        ('{"family": "lstm", "labels": ["a", "b"], "config": {"bogus": 1}}', "Invalid lstm config"),
        ("[1, 2]", "should be an object"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_specs_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelSpec.from_json(text)


def test_weights_of_another_shape_are_refused() -> None:
    small = build_model(tiny_spec())
    other = build_model(ModelSpec.create("lstm", ["a", "b", "c"], **{**TINY_LSTM, "hidden_dim": 4}))
    with pytest.raises(ValueError, match="has shape"):
        load_model_state(other, model_state(small))
    with pytest.raises(ValueError, match="not valid safetensors"):
        load_weights(small, b"garbage")
