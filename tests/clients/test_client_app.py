"""What crosses the Flower boundary: arrays, metrics and configs only, never training text."""

from __future__ import annotations

import time
from typing import Any

import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    Metadata,
    RecordDict,
)

from clients import local_data
from clients.client_app import make_client_app
from clients.local_data import NodeData
from models import build_model, model_state
from privacy.params import DPParams, poisson_schedule
from tests.factories import tiny_spec, toy_data


@pytest.fixture
def node(monkeypatch: pytest.MonkeyPatch) -> NodeData:
    data = NodeData("acme", toy_data(40), toy_data(12))
    monkeypatch.setattr(local_data, "_file_data", lambda *a: data)
    return data


def context() -> Context:
    return Context(
        run_id=1,
        node_id=7,
        node_config={"tenant": "acme", "data-path": "/data/acme.csv"},
        state=RecordDict(),
        run_config={},
    )


def message(kind: str, config: dict[str, Any], arrays: bool = True) -> Message:
    content = RecordDict({"config": ConfigRecord(config)})
    if arrays:
        content["arrays"] = ArrayRecord(model_state(build_model(tiny_spec())))
    # As a SuperNode delivers it: metadata set by the link, not by a running task.
    metadata = Metadata(
        run_id=1,
        message_id=f"m-{kind}",
        src_node_id=0,
        dst_node_id=7,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=kind,
        src_task_id=1,
        dst_task_id=2,
    )
    return Message(content=content, metadata=metadata)


def all_values(reply: Message) -> list[Any]:
    values: list[Any] = []
    for record in reply.content.values():
        assert (
            isinstance(record, ArrayRecord | ConfigRecord)
            or type(record).__name__ == "MetricRecord"
        )
        if isinstance(record, ArrayRecord):
            continue
        for v in record.values():
            values.extend(v if isinstance(v, list) else [v])
    return values


def assert_no_text(reply: Message, node: NodeData) -> None:
    sentences = set(node.train.texts) | set(node.test.texts)
    for value in all_values(reply):
        if isinstance(value, str | bytes):
            text = value.decode(errors="ignore") if isinstance(value, bytes) else value
            assert not any(s in text or (text and text in s and len(text) > 8) for s in sentences)
    for array in (r for r in reply.content.values() if isinstance(r, ArrayRecord)):
        for a in array.values():
            assert a.dtype.startswith("float") or a.dtype.startswith("int"), a.dtype


def test_replies_hold_only_arrays_metrics_and_configs(node: NodeData) -> None:
    app = make_client_app()
    spec = tiny_spec()
    rate, steps = poisson_schedule(len(node.train), 8, 1)
    dp = DPParams(1.0, rate, steps, 1.0, 1e-3)
    query = app(
        message(MessageType.QUERY, {"labels": ",".join(spec.labels)}, arrays=False), context()
    )
    assert query.content.config_records["node"]["tenant"] == "acme"
    assert query.content.metric_records["counts"]["num-train"] == 40
    train_cfg = {
        **dp.to_config(),
        "spec": spec.to_json(),
        "tenant": "acme",
        "server-round": 1,
        "local-epochs": 1,
        "batch-size": 8,
        "learning-rate": 0.1,
        "secure-mode": False,
    }
    train = app(message(MessageType.TRAIN, train_cfg), context())
    assert not train.has_error(), train.error.reason if train.has_error() else ""
    assert set(train.content.keys()) == {"arrays", "metrics", "dp"}
    assert DPParams.from_config(train.content["dp"]) == dp
    evaluate = app(message(MessageType.EVALUATE, {"spec": spec.to_json()}), context())
    assert set(evaluate.content.metric_records["metrics"].keys()) >= {
        "accuracy",
        "macro-f1",
        "num-examples",
    }
    for reply in (query, train, evaluate):
        assert_no_text(reply, node)


def test_a_train_message_for_another_tenant_is_refused(node: NodeData) -> None:
    spec = tiny_spec()
    rate, steps = poisson_schedule(len(node.train), 8, 1)
    cfg = {
        **DPParams(1.0, rate, steps, 1.0, 1e-3).to_config(),
        "spec": spec.to_json(),
        "tenant": "globex",
        "server-round": 1,
        "local-epochs": 1,
        "batch-size": 8,
        "learning-rate": 0.1,
        "secure-mode": False,
    }
    # Outside a SuperNode the exception propagates; a SuperNode turns it into an error reply.
    with pytest.raises(ValueError, match="serves 'acme', not 'globex'"):
        make_client_app()(message(MessageType.TRAIN, cfg), context())
