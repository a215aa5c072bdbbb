"""Privacy as a strategy wrapper: per-tenant DP instructions, a charge at dispatch, reply checks.

``PrivateStrategy(strategy, ...)`` wraps a Flower strategy the way Flower's own DP
wrappers do: it chooses who trains and what each tenant is told, while the wrapped
strategy keeps its own round state (FedAdam's starting point, FedProx's mu) and
aggregates. ``create_strategy(name)`` builds the Flower strategy to wrap.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from server.planning import TenantPlan
from server.replies import EVAL_PREFIX, Released, check_train_reply, read_evaluation, reply_failure

log = logging.getLogger("fedtext.server")

# (round, plans about to be dispatched) -> plans actually charged and allowed to train
ChargeFn = Callable[[int, list[TenantPlan]], list[TenantPlan]]
# (round, phase, plan, metrics) -> None; metrics are DP-released figures (or none)
MetricsSink = Callable[[int, str, TenantPlan, dict[str, float]], None]


@dataclass
class RoundLog:
    """What one dispatch came to, by tenant name.

    ``rejected`` and ``failed`` entries read "<where> <tenant>: <why>"; a failure is a
    code name, never the text a node sent (it can quote private data).
    """

    server_round: int
    phase: str  # "train", "evaluate", or "personalize" (the final phase with fine-tunes)
    dispatched: list[str] = field(default_factory=list)  # each charged before it was sent
    accepted: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    released: dict[str, Released] = field(default_factory=dict)  # DP-released evaluations
    personal: dict[str, ArrayRecord] = field(default_factory=dict)  # personalized weights


class _ChargedNodes:
    """The grid as the wrapped strategy sees it: only the nodes charged this round (it
    samples from it; sending stays with the caller, so no uncharged node is sent work)."""

    def __init__(self, node_ids: list[int]) -> None:
        self._node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)


class PrivateStrategy(Strategy):
    """Strategy wrapper that makes every release of a run private and charged.

    Each node receives its own tenant's DP parameters; a round is charged to the ledger
    before any message leaves (``charge``); a reply whose applied DP parameters differ
    from the plan is rejected and left out of the aggregate. The final phase
    (personalization and the released evaluation) has its own hooks,
    :meth:`configure_final` and :meth:`aggregate_final`.

    Parameters
    ----------
    strategy : Strategy
        The Flower strategy that aggregates. It must take every node it is shown (for
        FedAvg and its subclasses: ``fraction_train=1.0``, ``min_train_nodes=1``,
        ``min_available_nodes=1``): this wrapper does the selection.
    plans : Mapping[int, TenantPlan]
        Each participating node's plan, by node id.
    charge : ChargeFn
        Writes a round's charges and returns the plans it charged; only those train.
    sink : MetricsSink
        Receives progress: accepted updates and DP-released figures.
    train_config : Mapping[str, Any] or None
        What every node is told each round (model spec, local epochs, ...).
    fraction : float
        Fraction of the connected tenants sampled each round, in (0, 1].
    min_nodes : int
        Least number of tenants sampled each round (fewer when fewer are connected).
    seed : int
        Seed of the sampling, so a run's selection can be repeated.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        plans: Mapping[int, TenantPlan],
        charge: ChargeFn,
        sink: MetricsSink,
        train_config: Mapping[str, Any] | None = None,
        fraction: float = 1.0,
        min_nodes: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0 < fraction <= 1:
            raise ValueError("The fraction of tenants sampled should be in (0, 1].")
        if min_nodes < 1:
            raise ValueError("The minimum number of tenants per round should be positive.")
        if isinstance(strategy, FedAvg) and (
            strategy.fraction_train != 1.0
            or strategy.min_train_nodes > 1
            or strategy.min_available_nodes > 1
        ):
            # Otherwise it would wait for, or sample among, nodes it is never shown.
            raise ValueError(
                "The wrapped strategy should take every node it is shown "
                "(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1): "
                "PrivateStrategy selects the nodes."
            )
        self.strategy = strategy
        self.plans = dict(plans)
        self.charge = charge
        self.sink = sink
        self.train_config = dict(train_config or {})
        self.fraction = fraction
        self.min_nodes = min_nodes
        self.rng = random.Random(seed)
        self.arrayrecord_key = getattr(strategy, "arrayrecord_key", "arrays")
        self.configrecord_key = getattr(strategy, "configrecord_key", "config")
        self._logs: dict[tuple[int, str], RoundLog] = {}
        self._final: RoundLog | None = None

    def __repr__(self) -> str:
        return f"PrivateStrategy({self.strategy!r})"

    def summary(self) -> None:
        log.info("private strategy: %d tenant plan(s), fraction %g", len(self.plans), self.fraction)
        self.strategy.summary()

    # -- what a run reads back ---------------------------------------------------------

    def round_log(self, server_round: int, phase: str = "train") -> RoundLog:
        """The log of one dispatch; ``KeyError`` when nothing happened in it."""
        return self._logs[(server_round, phase)]

    @property
    def rejected(self) -> list[str]:
        return [entry for lg in self._logs.values() for entry in lg.rejected]

    @property
    def failed(self) -> list[str]:
        return [entry for lg in self._logs.values() for entry in lg.failed]

    @property
    def last_accepted(self) -> int:
        """How many updates the latest training round accepted."""
        trained = [lg for lg in self._logs.values() if lg.phase == "train"]
        return len(trained[-1].accepted) if trained else 0

    def _log(self, server_round: int, phase: str) -> RoundLog:
        return self._logs.setdefault((server_round, phase), RoundLog(server_round, phase))

    # -- selection and messages --------------------------------------------------------

    def live_plans(self, grid: Grid) -> list[TenantPlan]:
        connected = set(grid.get_node_ids())
        return [p for n, p in sorted(self.plans.items()) if n in connected]

    def sample(self, grid: Grid) -> list[TenantPlan]:
        live = self.live_plans(grid)
        size = min(len(live), max(self.min_nodes, round(self.fraction * len(live))))
        return sorted(self.rng.sample(live, size), key=lambda p: p.node_id)

    def _message(
        self, kind: str, plan: TenantPlan, records: RecordDict, values: dict[str, Any]
    ) -> Message:
        """``records`` with every config record completed for ``plan``'s tenant."""
        content = RecordDict(dict(records.items()))
        for key, cfg in records.config_records.items():
            content[key] = ConfigRecord({**self.train_config, **dict(cfg), **values})
        return Message(content=content, message_type=kind, dst_node_id=plan.node_id)

    # -- training rounds ---------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Charge the sampled tenants, then send each its own DP parameters."""
        round_log = self._log(server_round, "train")
        charged = self.charge(server_round, self.sample(grid))
        if not charged:
            return []
        # The wrapped strategy shapes the round (FedProx adds "proximal-mu", FedAdam keeps
        # the starting point); a copy of ``config``, since Flower's strategies write to it.
        shaped = {
            m.metadata.dst_node_id: m
            for m in self.strategy.configure_train(
                server_round,
                arrays,
                ConfigRecord(dict(config)),
                cast(Grid, _ChargedNodes([p.node_id for p in charged])),
            )
        }
        messages = []
        for plan in charged:  # a charged node the strategy left out stays charged
            if plan.node_id not in shaped:
                continue
            values = {
                **plan.round_params.to_config(),
                "server-round": server_round,
                "tenant": plan.tenant_name,
            }
            messages.append(
                self._message(MessageType.TRAIN, plan, shaped[plan.node_id].content, values)
            )
            round_log.dispatched.append(plan.tenant_name)
        return messages

    def accept_train_replies(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Replies that may be aggregated; failures and mismatches go to the round's log."""
        round_log = self._log(server_round, "train")
        weight_key = getattr(self.strategy, "weighted_by_key", "num-examples")
        accepted: list[Message] = []
        for msg in replies:
            plan = self.plans.get(msg.metadata.src_node_id)
            if plan is None or msg.has_error():
                reason = reply_failure(msg) if msg.has_error() else "unknown node"
                who = plan.tenant_name if plan else f"node {msg.metadata.src_node_id}"
                round_log.failed.append(f"round {server_round} {who}: {reason}")
                log.warning("round %d: %s failed: %s", server_round, who, reason)
                continue
            problem = check_train_reply(msg.content, plan, plan.round_params)
            if problem:
                round_log.rejected.append(f"round {server_round} {plan.tenant_name}: {problem}")
                log.error("round %d: rejected %s: %s", server_round, plan.tenant_name, problem)
                continue
            self.sink(server_round, "train", plan, {})
            # Only the weights are aggregated, weighted by the training count the node
            # stated at planning (the reply carries no count and no metric).
            msg.content = RecordDict(
                {
                    "arrays": msg.content.array_records["arrays"],
                    "weights": MetricRecord({weight_key: plan.num_train}),
                }
            )
            round_log.accepted.append(plan.tenant_name)
            accepted.append(msg)
        return accepted

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = self.accept_train_replies(server_round, replies)
        if not accepted:
            log.error("round %d: no valid training reply; the model is unchanged", server_round)
            return None, None
        return self.strategy.aggregate_train(server_round, accepted)

    # -- evaluation: released once, in the final phase ---------------------------------

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Nothing: every evaluation is a DP release to charge, so the global model is
        evaluated once, through :meth:`configure_final`."""
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Record each tenant's released (noised) evaluation; nothing is averaged."""
        round_log = self._log(server_round, "evaluate")
        for msg in replies:
            self._read_evaluation(round_log, msg)
        return None

    def _read_evaluation(self, round_log: RoundLog, msg: Message) -> None:
        plan = self.plans.get(msg.metadata.src_node_id)
        if plan is None:
            return
        if msg.has_error():
            round_log.failed.append(f"evaluation {plan.tenant_name}: {reply_failure(msg)}")
            return
        released = read_evaluation(msg.content, plan, ("global",))
        if isinstance(released, str):
            round_log.rejected.append(f"evaluation {plan.tenant_name}: {released}")
            return
        self.sink(round_log.server_round - 1, "evaluate", plan, released["global"])
        round_log.accepted.append(plan.tenant_name)
        round_log.released[plan.tenant_name] = released

    # -- the final phase: personalization and the released evaluation ------------------

    def configure_final(
        self,
        server_round: int,
        arrays: ArrayRecord,
        grid: Grid,
        *,
        charge: ChargeFn,
        personalize_epochs: int,
    ) -> list[Message]:
        """Messages of the final phase, each charged by ``charge`` before it is returned.

        With ``personalize_epochs`` each tenant fine-tunes the global model under DP and,
        in the same reply, releases noised confusion counts of both models; without, the
        global model is evaluated once and released the same way.
        """
        phase = "personalize" if personalize_epochs else "evaluate"
        self._final = round_log = self._log(server_round, phase)
        plans = charge(server_round, self.live_plans(grid))
        records = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: ConfigRecord()})
        messages = []
        for plan in plans:
            values: dict[str, Any] = {
                **(plan.eval_params.to_config(prefix=EVAL_PREFIX) if plan.eval_params else {}),
                "server-round": server_round,
                "tenant": plan.tenant_name,
            }
            if personalize_epochs:
                kind = MessageType.TRAIN
                values = {
                    **(plan.personal_params.to_config() if plan.personal_params else {}),
                    **values,
                    "local-epochs": personalize_epochs,
                    "phase": "personalize",
                }
            elif plan.eval_params is not None:
                kind = MessageType.EVALUATE
            else:
                continue
            messages.append(self._message(kind, plan, records, values))
            round_log.dispatched.append(plan.tenant_name)
        return messages

    def aggregate_final(self, server_round: int, replies: Iterable[Message]) -> RoundLog:
        """Check the final phase's replies; their released figures go to the sink."""
        round_log = self._final
        if round_log is None or round_log.server_round != server_round:
            raise ValueError(f"Round {server_round} has no configured final phase.")
        for msg in replies:
            if round_log.phase == "evaluate":
                self._read_evaluation(round_log, msg)
            else:
                self._read_personalized(round_log, msg)
        return round_log

    def _read_personalized(self, round_log: RoundLog, msg: Message) -> None:
        plan = self.plans.get(msg.metadata.src_node_id)
        if plan is None or plan.personal_params is None:
            return
        if msg.has_error():
            round_log.failed.append(f"personalization {plan.tenant_name}: {reply_failure(msg)}")
            return
        problem = check_train_reply(msg.content, plan, plan.personal_params)
        if problem:
            round_log.rejected.append(f"personalization {plan.tenant_name}: {problem}")
            return
        if plan.eval_params is not None:
            got = read_evaluation(msg.content, plan, ("global", "personal"))
            if isinstance(got, str):
                round_log.rejected.append(f"evaluation {plan.tenant_name}: {got}")
            else:
                self.sink(round_log.server_round - 1, "evaluate", plan, got["global"])
                self.sink(round_log.server_round, "personalize", plan, got["personal"])
                round_log.released[plan.tenant_name] = got
        # The fine-tune is kept even when its evaluation could not be used.
        round_log.accepted.append(plan.tenant_name)
        round_log.personal[plan.tenant_name] = msg.content.array_records["arrays"]


_BASES: dict[str, type[FedAvg]] = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam}


def strategy_names() -> list[str]:
    return sorted(_BASES)


def create_strategy(
    name: str, *, proximal_mu: float = 0.0, server_learning_rate: float = 0.1
) -> FedAvg:
    """Flower's strategy ``name``, ready for :class:`PrivateStrategy` to wrap; unknown
    names raise ValueError."""
    if name not in _BASES:
        raise ValueError(f"Unknown strategy {name!r}; known: {strategy_names()}.")
    # It takes every node it is shown: the wrapper does the selection.
    kwargs: dict[str, Any] = {
        "fraction_train": 1.0,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1,
        "min_available_nodes": 1,
    }
    if name == "fedprox":
        kwargs["proximal_mu"] = proximal_mu
    if name == "fedadam":
        kwargs["eta"] = server_learning_rate
    return _BASES[name](**kwargs)
