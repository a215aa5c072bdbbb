"""What crosses the Flower boundary: DP outputs only; failures as codes, never text."""

from __future__ import annotations

import json
import time
from pathlib import Path
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
from clients.data import DataError
from clients.local_data import NodeData
from models import build_model, model_state
from privacy.params import DPParams, poisson_schedule
from privacy.protocol import CLIENT_ERRORS
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


def train_config(dp: DPParams, tenant: str = "acme", **extra: Any) -> dict[str, Any]:
    return {
        **dp.to_config(),
        "spec": tiny_spec().to_json(),
        "tenant": tenant,
        "server-round": 1,
        "local-epochs": 1,
        "batch-size": 8,
        "learning-rate": 0.1,
        "secure-mode": False,
        **extra,
    }


EVAL = DPParams(5.0, 1.0, 1, 1.0, 1e-3)


def test_replies_hold_only_dp_outputs(node: NodeData) -> None:
    """The coordinator's view: no training metric, no exact test count, no text."""
    app = make_client_app()
    spec = tiny_spec()
    rate, steps = poisson_schedule(len(node.train), 8, 1)
    dp = DPParams(1.0, rate, steps, 1.0, 1e-3)
    query = app(
        message(MessageType.QUERY, {"labels": ",".join(spec.labels)}, arrays=False), context()
    )
    assert query.content.config_records["node"]["tenant"] == "acme"
    # The training count is stated (planning needs it); the test count is not sent.
    assert dict(query.content.metric_records["counts"]) == {"num-train": 40}
    train = app(message(MessageType.TRAIN, train_config(dp)), context())
    assert not train.has_error(), train.error.code if train.has_error() else ""
    assert set(train.content.keys()) == {"arrays", "dp"}
    assert not train.content.metric_records  # no loss, no accuracy, no count
    assert DPParams.from_config(train.content["dp"]) == dp
    cfg = {"spec": spec.to_json(), "tenant": "acme", **EVAL.to_config(prefix="eval-dp-")}
    evaluate = app(message(MessageType.EVALUATE, cfg), context())
    assert set(evaluate.content.keys()) == {"evaluation", "eval-dp"}
    assert DPParams.from_config(evaluate.content["eval-dp"], prefix="eval-dp-") == EVAL
    counts = evaluate.content.metric_records["evaluation"]["global"]
    assert isinstance(counts, list) and len(counts) == len(spec.labels) ** 2
    # Noised: not the integers of a confusion matrix, and not the exact total of 12.
    assert any(c != round(c) for c in counts) and sum(counts) != 12
    for reply in (query, train, evaluate):
        assert_no_text(reply, node)


def test_evaluation_without_a_release_to_charge_is_refused_with_a_code(node: NodeData) -> None:
    reply = make_client_app()(
        message(MessageType.EVALUATE, {"spec": tiny_spec().to_json()}), context()
    )
    assert reply.has_error()
    assert reply.error.code == CLIENT_ERRORS["no-evaluation-release"]
    assert reply.error.reason == "no-evaluation-release"


def test_personalization_releases_noised_global_and_personal_counts_and_keeps_exact_ones_local(
    node: NodeData, tmp_path: Path
) -> None:
    rate, steps = poisson_schedule(len(node.train), 8, 1)
    dp = DPParams(1.0, rate, steps, 1.0, 1e-3)
    two = DPParams(5.0, 1.0, 2, 1.0, 1e-3)
    cfg = train_config(dp, phase="personalize", **two.to_config(prefix="eval-dp-"))
    app = make_client_app({"metrics-dir": str(tmp_path)})
    reply = app(message(MessageType.TRAIN, cfg), context())
    assert not reply.has_error()
    assert set(reply.content.keys()) == {"arrays", "dp", "evaluation", "eval-dp"}
    released = reply.content.metric_records["evaluation"]
    assert set(released.keys()) == {"global", "personal"}
    kept = json.loads((tmp_path / "acme-1.json").read_text())
    assert kept["global"]["examples"] == 12 and 0 <= kept["personal"]["accuracy"] <= 1
    # One matrix asked for, two models to release: the node refuses, it does not overspend.
    one = train_config(dp, phase="personalize", **EVAL.to_config(prefix="eval-dp-"))
    refused = app(message(MessageType.TRAIN, one), context())
    assert refused.has_error() and refused.error.reason == "dp-plan-mismatch"


def test_a_train_message_for_another_tenant_is_refused_with_a_code(node: NodeData) -> None:
    rate, steps = poisson_schedule(len(node.train), 8, 1)
    cfg = train_config(DPParams(1.0, rate, steps, 1.0, 1e-3), tenant="globex")
    reply = make_client_app()(message(MessageType.TRAIN, cfg), context())
    assert reply.has_error()
    assert reply.error.code == CLIENT_ERRORS["wrong-tenant"]
    assert reply.error.reason == "wrong-tenant"


def test_a_data_error_leaves_as_a_code_never_as_its_text(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = "line 12 has unknown label 'diagnosis: HIV+'"

    def broken(*_: Any) -> NodeData:
        raise DataError(secret)

    monkeypatch.setattr(local_data, "_file_data", broken)
    reply = make_client_app()(
        message(MessageType.QUERY, {"labels": "negative,neutral,positive"}, arrays=False),
        context(),
    )
    assert reply.has_error()
    assert reply.error.code == CLIENT_ERRORS["data-error"]
    assert reply.error.reason == "data-error" and "HIV" not in str(reply.error.reason)


def test_a_plan_that_does_not_fit_the_local_data_is_refused_before_training(
    node: NodeData,
) -> None:
    rate, steps = poisson_schedule(len(node.train), 8, 1)
    cfg = train_config(DPParams(1.0, rate, steps + 1, 1.0, 1e-3))
    reply = make_client_app()(message(MessageType.TRAIN, cfg), context())
    assert reply.has_error() and reply.error.reason == "dp-plan-mismatch"
