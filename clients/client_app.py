"""The Flower ClientApp: answers query, train and evaluate with arrays, metrics and configs only.

No record this app returns ever holds text: weights, counts, metrics and DP parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.local_data import NodeData, resolve_node_data
from clients.train import evaluate, pick_device, train_dp
from models import ModelSpec, build_model, load_model_state, model_state
from privacy.params import DPParams


def _labels(config: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(s for s in str(config["labels"]).split(",") if s)


def _node_data(context: Context, labels: tuple[str, ...], overrides: Mapping[str, Any]) -> NodeData:
    return resolve_node_data(
        dict(context.node_config), {**dict(context.run_config), **overrides}, labels
    )


def _model_from(msg: Message, spec: ModelSpec) -> torch.nn.Module:
    model = build_model(spec)
    state = msg.content["arrays"].to_torch_state_dict()  # type: ignore[union-attr]
    return load_model_state(model, state)


class InjectedFault(RuntimeError):
    """A failure injected on purpose (``inject-fault`` in the run config) to test recovery."""


def _maybe_fail(
    context: Context, overrides: Mapping[str, Any], tenant: str, server_round: int
) -> None:
    """Raise when the run config says ``inject-fault = "TENANT:ROUND"`` for this node."""
    spec = str({**dict(context.run_config), **overrides}.get("inject-fault", ""))
    if spec and spec == f"{tenant}:{server_round}":
        raise InjectedFault(f"injected fault for {tenant} in round {server_round}")


def make_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp reading ``context.run_config`` with ``overrides`` on top (simulation)."""
    extra = dict(overrides or {})
    app = ClientApp()

    @app.query()
    def describe(msg: Message, context: Context) -> Message:
        labels = _labels(msg.content["config"])  # type: ignore[arg-type]
        data = _node_data(context, labels, extra)
        return Message(
            RecordDict(
                {
                    "node": ConfigRecord({"tenant": data.tenant}),
                    "counts": MetricRecord(
                        {"num-train": len(data.train), "num-test": len(data.test)}
                    ),
                }
            ),
            reply_to=msg,
        )

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        config = msg.content["config"]
        spec = ModelSpec.from_json(str(config["spec"]))  # type: ignore[index]
        data = _node_data(context, spec.labels, extra)
        if config["tenant"] != data.tenant:  # type: ignore[index]
            raise ValueError(f"This node serves {data.tenant!r}, not {config['tenant']!r}.")  # type: ignore[index]
        _maybe_fail(context, extra, data.tenant, int(config["server-round"]))  # type: ignore[index,arg-type]
        device = pick_device(str(context.node_config.get("device", "auto")))
        model = _model_from(msg, spec)
        personalize = config.get("phase") == "personalize"  # type: ignore[union-attr]
        before = evaluate(model, data.test, spec, device=device) if personalize else None
        result = train_dp(
            model,
            data.train,
            spec,
            DPParams.from_config(config),
            batch_size=int(config["batch-size"]),  # type: ignore[index,arg-type]
            epochs=int(config["local-epochs"]),  # type: ignore[index,arg-type]
            learning_rate=float(config["learning-rate"]),  # type: ignore[index,arg-type]
            secure_mode=bool(config["secure-mode"]),  # type: ignore[index]
            proximal_mu=float(config.get("proximal-mu", 0.0)),  # type: ignore[union-attr,arg-type]
            device=device,
        )
        dp = ConfigRecord({**result.applied.to_config(), "tenant": data.tenant})
        values: dict[str, int | float] = {
            "num-examples": result.examples,
            "loss": result.loss,
            "accuracy": result.accuracy,
        }
        if before is not None:
            # Personalization reports the global model and the fine-tuned one on the same
            # held-out split; the tenant's test data is never trained on.
            after = evaluate(model, data.test, spec, device=device)
            values = {
                "num-examples": result.examples,
                "loss": after.loss,
                "accuracy": after.accuracy,
                "macro-f1": after.macro_f1,
                "global-accuracy": before.accuracy,
                "global-macro-f1": before.macro_f1,
            }
        metrics = MetricRecord(dict(values))  # type: ignore[arg-type]
        arrays = ArrayRecord({k: v.cpu() for k, v in model_state(model).items()})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics, "dp": dp}), reply_to=msg)

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        spec = ModelSpec.from_json(str(msg.content["config"]["spec"]))  # type: ignore[index]
        data = _node_data(context, spec.labels, extra)
        device = pick_device(str(context.node_config.get("device", "auto")))
        result = evaluate(_model_from(msg, spec), data.test, spec, device=device)
        metrics = MetricRecord(
            {
                "num-examples": result.examples,
                "loss": result.loss,
                "accuracy": result.accuracy,
                "macro-f1": result.macro_f1,
            }
        )
        return Message(
            RecordDict({"metrics": metrics, "node": ConfigRecord({"tenant": data.tenant})}),
            reply_to=msg,
        )

    return app


app = make_client_app()
