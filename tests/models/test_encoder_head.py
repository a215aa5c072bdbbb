"""The encoder-head family: pluggable public encoders, their hash, the private head."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel

from clients.data import DEMO_LABELS
from models import EncoderError, ModelSpec, build_model, model_state, text_inputs
from models.assets import minilm_dir
from models.encoders import encoder_dir, load_encoder

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


def tiny_bert_dir(path: Path, seed: int = 0) -> Path:
    """A random 1-layer BERT with MiniLM's vocabulary, saved as a Hugging Face directory."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(str(path))
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_dir() / name, path / name)
    return path


def test_spec_names_the_encoder_and_the_hash_of_its_files() -> None:
    spec = ModelSpec.create("encoder-head", list(DEMO_LABELS))
    config = spec.family_config()
    assert config.encoder == "minilm-l6"
    assert len(config.encoder_sha256) == 64
    assert config.encoder_dim == 384
    assert ModelSpec.from_json(spec.to_json()) == spec


def test_only_the_head_is_in_the_weights() -> None:
    model = build_model(ModelSpec.create("encoder-head", list(DEMO_LABELS)))
    state = model_state(model)
    assert set(state) == {"head.0.weight", "head.0.bias"}
    assert sum(v.numel() for v in state.values()) == 384 * 3 + 3
    mlp = build_model(ModelSpec.create("encoder-head", list(DEMO_LABELS), hidden_dim=32))
    assert sum(v.numel() for v in model_state(mlp).values()) == 384 * 32 + 32 + 32 * 3 + 3


def test_minilm_vectors_are_unit_length_and_do_not_depend_on_the_batch() -> None:
    spec = ModelSpec.create("encoder-head", list(DEMO_LABELS))
    texts = ["short", "a much longer sentence about a delayed flight and a lost bag", "ok"]
    (together,) = text_inputs(spec, texts)
    (alone,) = text_inputs(spec, texts[1:2])
    assert together.shape == (3, 384)
    assert torch.allclose(together.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(together[1], alone[0], atol=1e-5)


def test_a_local_encoder_directory_is_a_pluggable_encoder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tiny_bert_dir(tmp_path / "tiny")
    monkeypatch.setenv("FEDTEXT_ENCODERS", f"tiny={path}")
    assert encoder_dir("tiny") == path.resolve()
    spec = ModelSpec.create("encoder-head", list(DEMO_LABELS), encoder="tiny")
    assert spec.family_config().encoder_dim == 16
    (vectors,) = text_inputs(spec, ["hello there", "another one", "lone \ud800 surrogate"])
    assert vectors.shape == (3, 16)
    logits = build_model(spec)(vectors)
    assert logits.shape == (3, 3)


def test_a_spec_cannot_name_a_path_only_an_operators_name(tmp_path: Path) -> None:
    path = tiny_bert_dir(tmp_path / "tiny")
    # A run request or a coordinator could otherwise probe this machine's folders.
    with pytest.raises(EncoderError, match="Unknown encoder"):
        ModelSpec.create("encoder-head", list(DEMO_LABELS), encoder=str(path))


def test_the_hash_covers_the_files_even_under_a_hidden_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one = tiny_bert_dir(tmp_path / ".venv" / "one", seed=0)
    two = tiny_bert_dir(tmp_path / ".venv" / "two", seed=1)
    monkeypatch.setenv("FEDTEXT_ENCODERS", f"one={one};two={two}")
    empty = hashlib.sha256(b"").hexdigest()
    sha_one = ModelSpec.create("encoder-head", ["a", "b"], encoder="one").family_config()
    sha_two = ModelSpec.create("encoder-head", ["a", "b"], encoder="two").family_config()
    assert empty not in (sha_one.encoder_sha256, sha_two.encoder_sha256)
    assert sha_one.encoder_sha256 != sha_two.encoder_sha256
    minilm = ModelSpec.create("encoder-head", ["a", "b"]).family_config().encoder_sha256
    assert minilm != empty  # the shipped encoder lives under .venv


def test_a_different_encoder_under_the_same_name_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tiny_bert_dir(tmp_path / "enc", seed=0)
    monkeypatch.setenv("FEDTEXT_ENCODERS", f"house={path}")
    spec = ModelSpec.create("encoder-head", list(DEMO_LABELS), encoder="house")
    # The operator replaces the files behind the name with other weights.
    shutil.rmtree(path)
    tiny_bert_dir(path, seed=1)
    with pytest.raises(EncoderError, match="trained on encoder 'house' with SHA-256"):
        text_inputs(spec, ["hello"])


def test_unknown_encoder_and_missing_hash_are_clear_errors() -> None:
    with pytest.raises(EncoderError, match="Unknown encoder 'nope'"):
        ModelSpec.create("encoder-head", list(DEMO_LABELS), encoder="nope")
    with pytest.raises(ValueError, match="encoder_sha256"):
        ModelSpec(family="encoder-head", labels=DEMO_LABELS, config={"encoder": "minilm-l6"})


def test_encoder_is_loaded_once_per_process() -> None:
    assert load_encoder() is load_encoder()


def test_minilm_with_a_dp_head_predicts_as_the_encoder_head_did() -> None:
    """LP-FT's starting point: the same vectors, the same head, the same predictions."""
    labels = list(DEMO_LABELS)
    torch.manual_seed(0)
    head_model = build_model(ModelSpec.create("encoder-head", labels))
    with torch.no_grad():
        head_model.head[0].weight.normal_()
        head_model.head[0].bias.normal_()
    minilm_spec = ModelSpec.create(
        "minilm", labels, trainable_layers=0, normalize=True, dropout=0.0, max_seq_len=64
    )
    minilm = build_model(minilm_spec).eval()
    with torch.no_grad():
        minilm.head.weight.copy_(head_model.head[0].weight)
        minilm.head.bias.copy_(head_model.head[0].bias)
    texts = ["the crew was lovely", "my bag is lost again and nobody answers the phone"]
    spec = ModelSpec.create("encoder-head", labels)
    with torch.no_grad():
        expected = torch.softmax(head_model(*text_inputs(spec, texts)), -1)
        got = torch.softmax(minilm(*text_inputs(minilm_spec, texts)), -1)
    assert torch.allclose(expected, got, atol=1e-4)
