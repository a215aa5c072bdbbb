"""A node of the encoder-head family: the head leaves it, its vectors never do."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, MessageType

from clients import local_data
from clients.client_app import make_client_app
from clients.local_data import NodeData
from models import ModelSpec, build_model, load_encoder, model_state
from privacy.params import DPParams, dp_batch_size, poisson_schedule
from privacy.protocol import error_name
from tests.clients.test_client_app import assert_no_text, context, message
from tests.factories import toy_data
from tests.models.test_encoder_head import tiny_bert_dir


@pytest.fixture
def node(monkeypatch: pytest.MonkeyPatch) -> NodeData:
    data = NodeData("acme", toy_data(90), toy_data(20))
    monkeypatch.setattr(local_data, "_file_data", lambda *a: data)
    return data


def test_a_train_reply_holds_the_head_only_and_the_node_encodes_once(node: NodeData) -> None:
    spec = ModelSpec.create("encoder-head", ["negative", "neutral", "positive"])
    rate, steps = poisson_schedule(len(node.train), dp_batch_size(len(node.train), 0), 1)
    dp = DPParams(1.0, rate, steps, 1.0, 1e-3)
    config = {
        **dp.to_config(),
        "spec": spec.to_json(),
        "tenant": "acme",
        "local-epochs": 1,
        "batch-size": 0,  # sized by the node's data, as the plan was
        "learning-rate": 0.05,
        "secure-mode": False,
    }
    app = make_client_app()
    encoder = load_encoder()
    before = encoder.texts_encoded
    replies = []
    for server_round in (1, 2, 3):
        msg = message(MessageType.TRAIN, {**config, "server-round": server_round}, arrays=False)
        msg.content["arrays"] = ArrayRecord(model_state(build_model(spec)))
        reply = app(msg, context())
        assert not reply.has_error(), reply.error.code if reply.has_error() else ""
        replies.append(reply)
    # Three rounds, one encoding of the node's training data.
    assert encoder.texts_encoded - before == len(node.train)
    for reply in replies:
        arrays = reply.content["arrays"]
        assert isinstance(arrays, ArrayRecord)
        assert {k: tuple(a.shape) for k, a in arrays.items()} == {
            "head.0.weight": (3, 384),
            "head.0.bias": (3,),
        }
        assert DPParams.from_config(reply.content["dp"]) == dp
        assert_no_text(reply, node)


def test_a_node_whose_encoder_differs_answers_with_a_code(
    node: NodeData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tiny_bert_dir(tmp_path / "enc", seed=0)
    monkeypatch.setenv("FEDTEXT_ENCODERS", f"house={path}")
    spec = ModelSpec.create("encoder-head", ["negative", "neutral", "positive"], encoder="house")
    shutil.rmtree(path)
    tiny_bert_dir(path, seed=1)  # this node's files under the same name are other weights
    rate, steps = poisson_schedule(len(node.train), dp_batch_size(len(node.train), 0), 1)
    config = {
        **DPParams(1.0, rate, steps, 1.0, 1e-3).to_config(),
        "spec": spec.to_json(),
        "tenant": "acme",
        "server-round": 1,
        "local-epochs": 1,
        "batch-size": 0,
        "learning-rate": 0.05,
        "secure-mode": False,
    }
    msg = message(MessageType.TRAIN, config, arrays=False)
    msg.content["arrays"] = ArrayRecord(model_state(build_model(spec)))
    reply = make_client_app()(msg, context())
    assert reply.has_error() and error_name(reply.error.code) == "encoder-mismatch"
    assert "SHA" not in (reply.error.reason or "")  # a code, never the text
