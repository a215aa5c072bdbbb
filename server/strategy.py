"""Flower strategies made private: per-tenant DP instructions, a charge at dispatch, reply checks.

``create_strategy(name)`` mixes :class:`PrivateMixin` into Flower's FedAvg, FedProx or
FedAdam, so aggregation stays Flower's own.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from privacy.evaluation import metrics_from_counts
from privacy.params import DPParams
from privacy.protocol import error_name
from server.planning import TenantPlan

log = logging.getLogger("fedtext.server")

# (round, plans about to be dispatched) -> plans actually charged and allowed to train
ChargeFn = Callable[[int, list[TenantPlan]], list[TenantPlan]]
# (round, phase, plan, metrics) -> None; metrics are DP-released figures (or none)
MetricsSink = Callable[[int, str, TenantPlan, dict[str, float]], None]
EVAL_PREFIX = "eval-dp-"


def reply_failure(msg: Message) -> str:
    """A node's error as its code name: never the free text a reply may carry."""
    return error_name(msg.error.code, msg.error.reason)


class PrivateMixin:
    """Private behaviour on top of a Flower strategy (which must derive from FedAvg).

    Each node receives its own tenant's DP parameters; a round is charged to the ledger
    before any message leaves (``charge``); a reply whose applied DP parameters differ
    from the plan is rejected and left out of the aggregate.
    """

    plans: dict[int, TenantPlan]
    train_config: dict[str, Any]
    charge: ChargeFn
    sink: MetricsSink
    rejected: list[str]
    failed: list[str]
    last_accepted: int
    fraction: float
    min_nodes: int
    rng: random.Random
    arrayrecord_key: str
    configrecord_key: str

    def setup_private(
        self,
        *,
        plans: dict[int, TenantPlan],
        train_config: dict[str, Any],
        charge: ChargeFn,
        sink: MetricsSink,
        fraction: float,
        min_nodes: int,
        seed: int,
    ) -> None:
        self.plans = plans
        self.train_config = train_config
        self.charge = charge
        self.sink = sink
        self.fraction = fraction
        self.min_nodes = min_nodes
        self.rng = random.Random(seed)
        self.rejected = []
        self.failed = []
        self.last_accepted = 0

    def live_plans(self, grid: Grid) -> list[TenantPlan]:
        connected = set(grid.get_node_ids())
        return [p for n, p in sorted(self.plans.items()) if n in connected]

    def sample(self, grid: Grid) -> list[TenantPlan]:
        live = self.live_plans(grid)
        size = min(len(live), max(self.min_nodes, round(self.fraction * len(live))))
        return sorted(self.rng.sample(live, size), key=lambda p: p.node_id)

    def _messages(
        self,
        kind: str,
        plans: list[TenantPlan],
        arrays: ArrayRecord,
        extra: Callable[[TenantPlan], dict[str, Any]],
    ) -> list[Message]:
        out = []
        for plan in plans:
            cfg = ConfigRecord({**self.train_config, **extra(plan)})
            content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: cfg})
            out.append(Message(content=content, message_type=kind, dst_node_id=plan.node_id))
        return out

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # FedOpt-based strategies (FedAdam) keep the round's starting point themselves.
        if hasattr(self, "current_arrays"):
            self.current_arrays = {k: a.numpy() for k, a in arrays.items()}
        charged = self.charge(server_round, self.sample(grid))
        # FedProx's own configure_train is bypassed (this mixin comes first): pass mu on.
        prox = {"proximal-mu": float(self.proximal_mu)} if hasattr(self, "proximal_mu") else {}
        return self._messages(
            MessageType.TRAIN,
            charged,
            arrays,
            lambda p: {
                **dict(config),
                **prox,
                **p.round_params.to_config(),
                "server-round": server_round,
                "tenant": p.tenant_name,
            },
        )

    def accept_train_replies(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Replies that may be aggregated; failures and mismatches are logged and kept."""
        accepted: list[Message] = []
        for msg in replies:
            plan = self.plans.get(msg.metadata.src_node_id)
            if plan is None or msg.has_error():
                reason = reply_failure(msg) if msg.has_error() else "unknown node"
                who = plan.tenant_name if plan else f"node {msg.metadata.src_node_id}"
                self.failed.append(f"round {server_round} {who}: {reason}")
                log.warning("round %d: %s failed: %s", server_round, who, reason)
                continue
            problem = check_train_reply(msg.content, plan, plan.round_params)
            if problem:
                self.rejected.append(f"round {server_round} {plan.tenant_name}: {problem}")
                log.error("round %d: rejected %s: %s", server_round, plan.tenant_name, problem)
                continue
            self.sink(server_round, "train", plan, {})
            # Only the weights are aggregated, weighted by the training count the node
            # stated at planning (the reply carries no count and no metric).
            msg.content = RecordDict(
                {
                    "arrays": msg.content.array_records["arrays"],
                    "weights": MetricRecord({"num-examples": plan.num_train}),
                }
            )
            accepted.append(msg)
        self.last_accepted = len(accepted)
        return accepted

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = self.accept_train_replies(server_round, replies)
        if not accepted:
            log.error("round %d: no valid training reply; the model is unchanged", server_round)
            return None, None
        return super().aggregate_train(server_round, accepted)  # type: ignore[misc]

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The final evaluation: to each given plan's node, with its release's DP parameters.

        ``server_round`` is the phase round the release was charged at; only plans whose
        evaluation release was charged should be passed (``plans`` in ``config``'s place
        is the caller's choice through ``evaluate_plans``).
        """
        return self.evaluate_messages(server_round, arrays, self.live_plans(grid))

    def evaluate_messages(
        self, server_round: int, arrays: ArrayRecord, plans: list[TenantPlan]
    ) -> list[Message]:
        return self._messages(
            MessageType.EVALUATE,
            [p for p in plans if p.eval_params is not None],
            arrays,
            lambda p: {
                **(p.eval_params.to_config(prefix=EVAL_PREFIX) if p.eval_params else {}),
                "server-round": server_round,
                "tenant": p.tenant_name,
            },
        )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Record each tenant's released (noised) evaluation; nothing is averaged."""
        for msg in replies:
            plan = self.plans.get(msg.metadata.src_node_id)
            if plan is None:
                continue
            if msg.has_error():
                self.failed.append(f"evaluation {plan.tenant_name}: {reply_failure(msg)}")
                continue
            released = read_evaluation(msg.content, plan, ("global",))
            if isinstance(released, str):
                self.rejected.append(f"evaluation {plan.tenant_name}: {released}")
                continue
            self.sink(server_round - 1, "evaluate", plan, released["global"])
        return None


def read_evaluation(
    content: RecordDict, plan: TenantPlan, models: tuple[str, ...]
) -> dict[str, dict[str, float]] | str:
    """The released metrics of each of ``models`` (from noised counts), or why the reply
    cannot be used."""
    if plan.eval_params is None:
        return "no evaluation release was planned"
    if "eval-dp" not in content.config_records or "evaluation" not in content.metric_records:
        return "reply lacks its evaluation release"
    dp = content.config_records["eval-dp"]
    if dp.get("tenant") != plan.tenant_name:
        return f"evaluation claims tenant {dp.get('tenant')!r}"
    try:
        applied = DPParams.from_config(dp, prefix=EVAL_PREFIX)
    except ValueError as exc:
        return str(exc)
    if not plan.eval_params.matches(applied):
        return f"applied evaluation DP parameters {applied} differ from {plan.eval_params}"
    record = content.metric_records["evaluation"]
    out = {}
    for name in models:
        counts = record.get(name)
        if not isinstance(counts, list):
            return f"evaluation lacks the counts of the {name} model"
        classes = round(len(counts) ** 0.5)
        try:
            out[name] = metrics_from_counts([float(c) for c in counts], classes)
        except ValueError as exc:
            return str(exc)
    return out


def check_train_reply(content: RecordDict, plan: TenantPlan, asked: DPParams) -> str | None:
    """Why a training reply cannot be used, or None when it is sound."""
    if "dp" not in content.config_records or "arrays" not in content.array_records:
        return "reply lacks its weights or its DP record"
    dp = content.config_records["dp"]
    if dp.get("tenant") != plan.tenant_name:
        return f"reply claims tenant {dp.get('tenant')!r}"
    try:
        applied = DPParams.from_config(dp)
    except ValueError as exc:
        return str(exc)
    if not asked.matches(applied):
        return f"applied DP parameters {applied} differ from the requested {asked}"
    return None


_BASES: dict[str, type[FedAvg]] = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam}


def strategy_names() -> list[str]:
    return sorted(_BASES)


def create_strategy(
    name: str,
    *,
    min_nodes: int,
    proximal_mu: float = 0.0,
    server_learning_rate: float = 0.1,
) -> FedAvg:
    """A private variant of Flower's strategy ``name``; unknown names raise ValueError."""
    if name not in _BASES:
        raise ValueError(f"Unknown strategy {name!r}; known: {strategy_names()}.")
    base = _BASES[name]
    cls = type(f"Private{base.__name__}", (PrivateMixin, base), {})
    kwargs: dict[str, Any] = {
        "min_train_nodes": min_nodes,
        "min_evaluate_nodes": min_nodes,
        "min_available_nodes": min_nodes,
    }
    if name == "fedprox":
        kwargs["proximal_mu"] = proximal_mu
    if name == "fedadam":
        kwargs["eta"] = server_learning_rate
    strategy: FedAvg = cls(**kwargs)
    return strategy


def private_part(strategy: Strategy) -> PrivateMixin:
    """The PrivateMixin inside ``strategy``, looking through Flower's DP wrappers."""
    inner: Any = strategy
    while not isinstance(inner, PrivateMixin):
        inner = inner.strategy
    return inner
