"""Private strategies on real Flower messages: DP checks, charging, FedProx/FedAdam, client DP."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

from privacy.budget import check_budget
from privacy.params import DPParams
from server.planning import TenantPlan
from server.replies import read_evaluation
from server.strategy import PrivateStrategy, create_strategy

PARAMS = DPParams(1.2, 0.25, 4, 1.0, 1e-5)
EVAL = DPParams(10.0, 1.0, 1, 1.0, 1e-5)


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a running ServerApp process has: the identity its messages are stamped with."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def plan(node_id: int, name: str, num_train: int = 16) -> TenantPlan:
    budget = check_budget([], [PARAMS], budget_epsilon=10, delta=1e-5)
    return TenantPlan(f"id-{name}", name, node_id, num_train, 0, PARAMS, 2, budget, None, EVAL)


class FakeGrid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def meta(node_id: int, kind: str = MessageType.TRAIN) -> Metadata:
    return Metadata(
        run_id=1, message_id=f"r{node_id}", src_node_id=node_id, dst_node_id=0,
        reply_to_message_id="x", group_id="1", created_at=time.time(), ttl=60.0,
        message_type=kind,
    )  # fmt: skip


def reply(node_id: int, tenant: str, value: float, dp: DPParams = PARAMS) -> Message:
    """A node's training reply as it is now: weights and the DP parameters applied, only."""
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": torch.full((3,), value)}),
            "dp": ConfigRecord({**dp.to_config(), "tenant": tenant}),
        }
    )
    return Message(content=content, metadata=meta(node_id))


def error_reply(node_id: int, code: int, reason: str) -> Message:
    msg = Message(content=RecordDict(), metadata=meta(node_id))
    msg.__dict__["_content"] = None
    msg.__dict__["_error"] = Error(code=code, reason=reason)
    return msg


def setup(name: str, **kwargs: Any):  # type: ignore[no-untyped-def]
    charged: list[tuple[int, list[str]]] = []
    metrics: list[tuple[int, str, str]] = []
    strategy = PrivateStrategy(
        create_strategy(name, **kwargs),
        plans={1: plan(1, "acme"), 2: plan(2, "globex")},
        train_config={"batch-size": 4},
        charge=lambda r, plans: charged.append((r, [p.tenant_name for p in plans])) or plans,
        sink=lambda r, phase, p, m: metrics.append((r, phase, p.tenant_name)),
        fraction=1.0,
        min_nodes=2,
        seed=0,
    )
    return strategy, charged, metrics


def test_each_node_gets_its_own_dp_parameters_and_the_round_is_charged_first() -> None:
    strategy, charged, _ = setup("fedavg")
    arrays = ArrayRecord({"w": torch.zeros(3)})
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([1, 2, 99])))
    assert charged == [(1, ["acme", "globex"])]  # node 99 has no plan: never dispatched
    assert [m.metadata.dst_node_id for m in messages] == [1, 2]
    cfg = messages[0].content["config"]
    assert DPParams.from_config(cfg) == PARAMS and cfg["tenant"] == "acme"


def test_a_reply_with_other_dp_parameters_is_left_out() -> None:
    strategy, _, metrics = setup("fedavg")
    cheat = DPParams(0.5, 0.25, 4, 1.0, 1e-5)  # less noise than asked
    arrays, _ = strategy.aggregate_train(1, [reply(1, "acme", 1.0), reply(2, "globex", 9.0, cheat)])
    assert arrays is not None
    np.testing.assert_allclose(arrays["w"].numpy(), 1.0)  # only acme's update counts
    assert strategy.last_accepted == 1
    assert "differ from the requested" in strategy.rejected[0]
    assert metrics == [(1, "train", "acme")]


def test_a_reply_claiming_another_tenant_is_rejected() -> None:
    strategy, _, _ = setup("fedavg")
    strategy.aggregate_train(1, [reply(1, "globex", 1.0), reply(2, "globex", 2.0)])
    assert "claims tenant 'globex'" in strategy.rejected[0]


def test_fedprox_passes_mu_and_fedadam_moves_by_its_server_rate() -> None:
    prox, _, _ = setup("fedprox", proximal_mu=0.3)
    arrays = ArrayRecord({"w": torch.zeros(3)})
    msgs = list(prox.configure_train(1, arrays, ConfigRecord(), FakeGrid([1, 2])))
    assert msgs[0].content["config"]["proximal-mu"] == pytest.approx(0.3)

    adam, _, _ = setup("fedadam", server_learning_rate=0.1)
    list(adam.configure_train(1, arrays, ConfigRecord(), FakeGrid([1, 2])))
    new, _ = adam.aggregate_train(1, [reply(1, "acme", 1.0), reply(2, "globex", 1.0)])
    assert new is not None
    w = new["w"].numpy()
    assert np.all(w > 0) and np.all(w < 1.0)  # an Adam step towards the average, not a jump


def test_client_level_dp_wrapper_clips_and_noises_updates() -> None:
    strategy, _, _ = setup("fedavg")
    wrapped = DifferentialPrivacyServerSideFixedClipping(strategy, 0.0001, 1.0, 2)
    arrays = ArrayRecord({"w": torch.zeros(3)})
    list(wrapped.configure_train(1, arrays, ConfigRecord(), FakeGrid([1, 2])))
    new, _ = wrapped.aggregate_train(1, [reply(1, "acme", 100.0), reply(2, "globex", 100.0)])
    assert new is not None
    # Each update (norm ~173) is clipped to norm 1 before averaging.
    assert np.linalg.norm(new["w"].numpy()) == pytest.approx(1.0, abs=0.01)


def test_aggregation_weights_by_the_stated_training_count_not_by_reply_content() -> None:
    strategy = PrivateStrategy(
        create_strategy("fedavg"),
        plans={1: plan(1, "acme", 16), 2: plan(2, "globex", 48)},
        train_config={},
        charge=lambda r, plans: plans,
        sink=lambda *a: None,
        fraction=1.0,
        min_nodes=2,
        seed=0,
    )
    arrays, _ = strategy.aggregate_train(1, [reply(1, "acme", 1.0), reply(2, "globex", 9.0)])
    assert arrays is not None
    np.testing.assert_allclose(arrays["w"].numpy(), (16 * 1.0 + 48 * 9.0) / 64, rtol=1e-6)


def test_a_coordinators_view_of_a_round_holds_no_metric_count_or_error_text() -> None:
    """What the strategy keeps of a round: accepted updates with no metric, failures as codes."""
    strategy, _, metrics = setup("fedavg")
    leaky = "line 12 has unknown label 'diagnosis: HIV+'"
    replies = [reply(1, "acme", 1.0), error_reply(2, 103, leaky)]
    accepted = strategy.accept_train_replies(1, replies)
    assert len(accepted) == 1
    # What aggregation sees: the weights and the count stated at planning, nothing else.
    content = accepted[0].content
    assert set(content.array_records) == {"arrays"}
    assert dict(content.metric_records["weights"]) == {"num-examples": 16}
    assert metrics == [(1, "train", "acme")]
    assert strategy.failed == ["round 1 globex: data-error"]
    # Whatever the reason says (Flower puts a traceback there), only the code is kept.
    strategy.accept_train_replies(2, [error_reply(1, 2, "Traceback: free text")])
    assert strategy.failed[-1] == "round 2 acme: flower-client-app-raised"
    assert all("HIV" not in f and "free text" not in f for f in strategy.failed)


def test_a_released_evaluation_is_read_from_noised_counts_and_checked() -> None:
    strategy, _, metrics = setup("fedavg")
    counts = [50.3, 2.1, -1.2, 4.0, 20.7, 3.3, 0.4, 1.9, 30.2]
    good = RecordDict(
        {
            "evaluation": MetricRecord({"global": counts}),
            "eval-dp": ConfigRecord({**EVAL.to_config(prefix="eval-dp-"), "tenant": "acme"}),
        }
    )
    cheat = DPParams(0.5, 1.0, 1, 1.0, 1e-5)
    bad = RecordDict(
        {
            "evaluation": MetricRecord({"global": counts}),
            "eval-dp": ConfigRecord({**cheat.to_config(prefix="eval-dp-"), "tenant": "globex"}),
        }
    )
    m1 = Message(content=good, metadata=meta(1, MessageType.EVALUATE))
    m2 = Message(content=bad, metadata=meta(2, MessageType.EVALUATE))
    strategy.aggregate_evaluate(3, [m1, m2])
    assert metrics == [(2, "evaluate", "acme")]
    assert "differ from" in strategy.rejected[0]
    got = read_evaluation(good, plan(1, "acme"), ("global",))
    assert isinstance(got, dict)
    # Noised counts are used as released, negative ones too (their sums stay unbiased):
    # the diagonal 50.3 + 20.7 + 30.2 over the total; with its SD and 95% interval under
    # the plan's evaluation noise.
    released = got["global"]
    assert released["accuracy"] == pytest.approx(101.2 / sum(counts))
    assert released["examples_sd"] == pytest.approx(3 * EVAL.noise_multiplier)
    assert released["accuracy_low"] < released["accuracy"] < released["accuracy_high"]


def test_unknown_strategy_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="Unknown strategy 'fedsgd'"):
        create_strategy("fedsgd")
