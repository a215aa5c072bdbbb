"""FedAvg with per-tenant DP instructions, a charge at dispatch and reply validation."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from privacy.params import DPParams
from server.planning import TenantPlan

log = logging.getLogger("fedtext.server")

# (round, plans about to be dispatched) -> plans actually charged and allowed to train
ChargeFn = Callable[[int, list[TenantPlan]], list[TenantPlan]]
# (round, phase, plan, metrics) -> None
MetricsSink = Callable[[int, str, TenantPlan, dict[str, float]], None]


class PrivateFedAvg(FedAvg):
    """FedAvg over the nodes of planned tenants.

    Each node receives its own tenant's DP parameters; the round is charged to the
    ledger before any message leaves (``charge``), and a reply whose applied DP
    parameters differ from the plan is rejected and left out of the aggregate.
    """

    def __init__(
        self,
        *,
        plans: dict[int, TenantPlan],
        train_config: dict[str, Any],
        charge: ChargeFn,
        sink: MetricsSink,
        min_nodes: int,
    ) -> None:
        super().__init__(
            min_train_nodes=min_nodes,
            min_evaluate_nodes=min_nodes,
            min_available_nodes=min_nodes,
        )
        self.plans = plans
        self.train_config = train_config
        self.charge = charge
        self.sink = sink
        self.rejected: list[str] = []

    def _live_plans(self, grid: Grid) -> list[TenantPlan]:
        connected = set(grid.get_node_ids())
        return [p for n, p in self.plans.items() if n in connected]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        charged = self.charge(server_round, self._live_plans(grid))
        messages = []
        for plan in charged:
            cfg = ConfigRecord(
                {
                    **self.train_config,
                    **plan.round_params.to_config(),
                    "server-round": server_round,
                    "tenant": plan.tenant_name,
                }
            )
            content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: cfg})
            messages.append(
                Message(content=content, message_type=MessageType.TRAIN, dst_node_id=plan.node_id)
            )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = []
        for msg in replies:
            plan = self.plans.get(msg.metadata.src_node_id)
            if plan is None or msg.has_error():
                reason = msg.error.reason if msg.has_error() else "unknown node"
                log.warning(
                    "round %d: node %s failed: %s", server_round, msg.metadata.src_node_id, reason
                )
                continue
            problem = _check_train_reply(msg.content, plan)
            if problem:
                self.rejected.append(f"round {server_round} {plan.tenant_name}: {problem}")
                log.error(
                    "round %d: rejected reply of %s: %s", server_round, plan.tenant_name, problem
                )
                continue
            metrics = msg.content["metrics"]
            self.sink(server_round, "train", plan, {k: float(v) for k, v in metrics.items()})  # type: ignore[arg-type]
            accepted.append(msg)
        if not accepted:
            log.error(
                "round %d: no valid training reply; the global model is unchanged", server_round
            )
            return None, None
        return super().aggregate_train(server_round, accepted)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = []
        for plan in self._live_plans(grid):
            cfg = ConfigRecord({**self.train_config, "server-round": server_round})
            content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: cfg})
            messages.append(
                Message(
                    content=content, message_type=MessageType.EVALUATE, dst_node_id=plan.node_id
                )
            )
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        accepted = []
        for msg in replies:
            plan = self.plans.get(msg.metadata.src_node_id)
            if plan is None or msg.has_error():
                continue
            metrics = msg.content["metrics"]
            self.sink(server_round, "evaluate", plan, {k: float(v) for k, v in metrics.items()})  # type: ignore[arg-type]
            accepted.append(msg)
        return super().aggregate_evaluate(server_round, accepted) if accepted else None


def _check_train_reply(content: RecordDict, plan: TenantPlan) -> str | None:
    """Why a training reply cannot be aggregated, or None when it is sound."""
    if "dp" not in content.config_records or "metrics" not in content.metric_records:
        return "reply lacks its DP record or metrics"
    dp = content.config_records["dp"]
    if dp.get("tenant") != plan.tenant_name:
        return f"reply claims tenant {dp.get('tenant')!r}"
    try:
        applied = DPParams.from_config(dp)
    except ValueError as exc:
        return str(exc)
    if not plan.round_params.matches(applied):
        return f"applied DP parameters {applied} differ from the requested {plan.round_params}"
    return None
