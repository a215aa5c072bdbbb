"""The Flower ClientApp: what leaves a tenant's node is DP output only.

Replies hold trained weights and the DP parameters applied (train), DP-noised
confusion counts of the held-out split with the DP parameters of that release
(evaluate, and personalization), and the number of training examples (query; planning
needs it, docs/AUDIT.md states it). No training loss or accuracy, no exact test count
and no exception text ever leaves: a failure is replied as a code from
``privacy.protocol.CLIENT_ERRORS`` and its details go to the node's own log. Exact
evaluation metrics stay on the node: with ``metrics-dir`` in the node config they are
written there, where only the tenant reads them.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from torch.utils.data import DataLoader

from clients.data import DataError, LabeledData
from clients.local_data import NodeData, privacy_unit, resolve_node_data
from clients.train import encode, pick_device, train_dp, train_dp_users, user_schedule
from models import EncoderError, ModelSpec, build_model, load_model_state, model_state
from privacy.evaluation import confusion_counts, metrics_from_counts, noised
from privacy.node_proof import load_private_key, proof_payload, sign_proof
from privacy.params import DPParams, dp_batch_size, poisson_schedule
from privacy.protocol import CLIENT_ERRORS

log = logging.getLogger("fedtext.client")
EVAL_PREFIX = "eval-dp-"  # config keys of the evaluation release's DP parameters


class ClientRefusal(Exception):
    """A failure with a code the coordinator may see (``privacy.protocol.CLIENT_ERRORS``)."""

    def __init__(self, code: str, detail: str = "") -> None:
        if code not in CLIENT_ERRORS:
            raise ValueError(f"Unknown client error code {code!r}.")
        super().__init__(detail or code)
        self.code = code


class InjectedFault(ClientRefusal):
    """A failure injected on purpose (``inject-fault`` in the run config) to test recovery."""

    def __init__(self, detail: str) -> None:
        super().__init__("injected-fault", detail)


def _code_of(exc: BaseException) -> str:
    if isinstance(exc, ClientRefusal):
        return exc.code
    if isinstance(exc, DataError):
        return "data-error"
    if isinstance(exc, EncoderError):
        return "encoder-mismatch"
    if isinstance(exc, KeyError | TypeError):
        return "bad-request"
    return "internal"


Handler = Callable[[Message, Context], Message]


def coded_errors(handler: Handler) -> Handler:
    """Turn any exception into an error reply that holds a code only; log the details here."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as exc:
            code = _code_of(exc)
            # The node's own log keeps the details: it is on the tenant's premises.
            log.exception("%s failed (%s)", msg.metadata.message_type, code)
            return Message(Error(code=CLIENT_ERRORS[code], reason=code), reply_to=msg)

    return wrapped


def _labels(config: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(s for s in str(config["labels"]).split(",") if s)


def _node_data(context: Context, labels: tuple[str, ...], overrides: Mapping[str, Any]) -> NodeData:
    return resolve_node_data(
        dict(context.node_config), {**dict(context.run_config), **overrides}, labels
    )


def _user_bound(run: Mapping[str, Any]) -> int:
    """k (max-examples-per-user) for a privacy-unit user run, 0 for privacy-unit example."""
    if privacy_unit(run) != "user":
        return 0
    if not run.get("max-examples-per-user"):
        raise ClientRefusal("bad-request", "privacy-unit user without max-examples-per-user")
    return int(run["max-examples-per-user"])


def _units(data: NodeData, run: Mapping[str, Any]) -> int:
    """What the node states as its training count: examples, or users (privacy-unit user)."""
    return data.train.num_users() if _user_bound(run) else len(data.train)


def _model_from(msg: Message, spec: ModelSpec) -> torch.nn.Module:
    model = build_model(spec)
    state = msg.content["arrays"].to_torch_state_dict()  # type: ignore[union-attr]
    return load_model_state(model, state)


def _maybe_fail(
    context: Context, overrides: Mapping[str, Any], tenant: str, server_round: int
) -> None:
    """Raise when the run config says ``inject-fault = "TENANT:ROUND"`` for this node."""
    spec = str({**dict(context.run_config), **overrides}.get("inject-fault", ""))
    if spec and spec == f"{tenant}:{server_round}":
        raise InjectedFault(f"injected fault for {tenant} in round {server_round}")


@torch.no_grad()
def confusion(
    model: torch.nn.Module, data: LabeledData, spec: ModelSpec, device: torch.device
) -> list[float]:
    """Exact confusion counts of ``model`` on ``data`` (they never leave the node as such)."""
    model.to(device).eval()
    truth: list[int] = []
    preds: list[int] = []
    for *batch, labels in DataLoader(encode(data, spec, device), batch_size=256):
        preds += model(*(t.to(device) for t in batch)).argmax(-1).cpu().tolist()
        truth += labels.tolist()
    return confusion_counts(truth, preds, len(spec.labels))


def _eval_params(config: Any, sensitivity: float = 1.0) -> DPParams | None:
    if f"{EVAL_PREFIX}noise-multiplier" not in config:
        return None
    params = DPParams.from_config(config, prefix=EVAL_PREFIX)
    # Clip: the sensitivity of one count matrix, 1 example (or k rows of one user).
    if params.sample_rate != 1.0 or params.clip_norm != sensitivity:
        raise ClientRefusal(
            "bad-request", f"an evaluation release has sample rate 1, clip {sensitivity:g}"
        )
    return params


def _keep_locally(
    context: Context, overrides: Mapping[str, Any], tenant: str, run: Any, exact: dict[str, Any]
) -> None:
    """Write the exact metrics where only this tenant reads them (``metrics-dir``), if set."""
    where = context.node_config.get("metrics-dir") or overrides.get("metrics-dir")
    if not where:
        return
    folder = Path(str(where))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{tenant}-{run}.json"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"tenant": tenant, "run": str(run), **exact}, indent=2))
    tmp.replace(path)


def _release(
    models: dict[str, torch.nn.Module],
    data: NodeData,
    spec: ModelSpec,
    params: DPParams,
    device: torch.device,
    secure: bool,
) -> tuple[RecordDict, dict[str, Any]]:
    """The noised confusion counts of each model (one Gaussian step each) and the exact
    metrics that stay here."""
    if params.steps != len(models):
        raise ClientRefusal("dp-plan-mismatch", f"{params.steps} steps for {len(models)} models")
    released: dict[str, int | float | list[int] | list[float]] = {}
    exact: dict[str, Any] = {}
    for name, model in models.items():
        counts = confusion(model, data.test, spec, device)
        # Standard deviation sigma * sensitivity (sensitivity 1 per example, k per user).
        sd = params.noise_multiplier * params.clip_norm
        released[name] = noised(counts, sd, secure=secure)
        exact[name] = metrics_from_counts(counts, len(spec.labels))
    applied = ConfigRecord({**params.to_config(prefix=EVAL_PREFIX), "tenant": data.tenant})
    return RecordDict({"evaluation": MetricRecord(released), "eval-dp": applied}), exact


def describe_node(
    node_config: Mapping[str, Any],
    *,
    node_id: int,
    tenant: str,
    num_train: int,
    nonce: str,
    run_id: str,
) -> dict[str, Any]:
    """What the node says of itself in its discovery reply: its tenant, the dataset it
    declares (node config ``dataset``; none: the coordinator's default) and, when it holds
    a node key (node config
    ``auth-key``: the SuperNode's own ``--auth-supernode-private-key``), its signature of
    the coordinator's nonce with all of it (``privacy.node_proof``). The coordinator
    takes the tenant from the key, not from this reply; a simulated node has no key."""
    dataset = str(node_config.get("dataset") or "")
    described: dict[str, Any] = {"tenant": tenant, "dataset": dataset}
    key_path = str(node_config.get("auth-key") or "")
    if key_path and nonce:
        payload = proof_payload(
            nonce=nonce,
            run_id=run_id,
            node_id=node_id,
            tenant=tenant,
            dataset=dataset,
            num_train=num_train,
        )
        described["proof"] = sign_proof(load_private_key(key_path), payload)
    return described


def make_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp reading ``context.run_config`` with ``overrides`` on top (simulation)."""
    extra = dict(overrides or {})
    app = ClientApp()

    @app.query()
    @coded_errors
    def describe(msg: Message, context: Context) -> Message:
        config = msg.content["config"]
        labels = _labels(config)  # type: ignore[arg-type]
        data = _node_data(context, labels, extra)
        # privacy-unit user: the planning unit is a user, so the stated count is users.
        num_train = _units(data, {**dict(context.run_config), **extra})
        node = describe_node(
            dict(context.node_config),
            node_id=context.node_id,
            tenant=data.tenant,
            num_train=num_train,
            nonce=str(config.get("nonce", "")),  # type: ignore[union-attr]
            run_id=str(config.get("run", "")),  # type: ignore[union-attr]
        )
        return Message(
            RecordDict(
                {
                    "node": ConfigRecord(node),
                    # The training count is stated (docs/AUDIT.md); the test count stays here.
                    "counts": MetricRecord({"num-train": num_train}),
                }
            ),
            reply_to=msg,
        )

    @app.train()
    @coded_errors
    def train(msg: Message, context: Context) -> Message:
        config = msg.content["config"]
        spec = ModelSpec.from_json(str(config["spec"]))  # type: ignore[index]
        data = _node_data(context, spec.labels, extra)
        if config["tenant"] != data.tenant:  # type: ignore[index]
            raise ClientRefusal("wrong-tenant")
        _maybe_fail(context, extra, data.tenant, int(config["server-round"]))  # type: ignore[index,arg-type]
        device = pick_device(str(context.node_config.get("device", "auto")))
        model = _model_from(msg, spec)
        asked = DPParams.from_config(config)
        run = {**dict(context.run_config), **extra}
        k = _user_bound(run)
        # 0: sized by this node's data (users, for privacy-unit user), as planning sizes it.
        epochs = int(config["local-epochs"])  # type: ignore[index,arg-type]
        if k:
            asked_batch = int(config["batch-size"])  # type: ignore[index,arg-type]
            batch_size, rate, steps = user_schedule(data.train.num_users(), asked_batch, epochs)
        else:
            batch_size = dp_batch_size(len(data.train), int(config["batch-size"]))  # type: ignore[index,arg-type]
            rate, steps = poisson_schedule(len(data.train), batch_size, epochs)
        if not asked.matches(
            DPParams(asked.noise_multiplier, rate, steps, asked.clip_norm, asked.delta)
        ):
            raise ClientRefusal("dp-plan-mismatch")
        evaluation = _eval_params(config, float(k or 1))
        secure = bool(config["secure-mode"])  # type: ignore[index]
        before = build_model(spec) if evaluation else None
        if before is not None:
            load_model_state(before, model_state(model))
        common: dict[str, Any] = {
            "batch_size": batch_size,
            "epochs": epochs,
            "learning_rate": float(config["learning-rate"]),  # type: ignore[index,arg-type]
            "secure_mode": secure,
            "proximal_mu": float(config.get("proximal-mu", 0.0)),  # type: ignore[union-attr,arg-type]
            "device": device,
        }
        if k:
            if spec.family != "encoder-head":
                raise ClientRefusal("bad-request", "privacy-unit user: encoder-head only")
            result = train_dp_users(
                model, data.train, spec, asked, max_examples_per_user=k, **common
            )
            if result.left_out:
                # Said in the node's own log, not sent: a count of rows is the tenant's.
                log.warning(
                    "tenant %s: %d of %d training rows left out: users with more than "
                    "max-examples-per-user %d rows keep %d of them (privacy-unit user)",
                    data.tenant, result.left_out, len(data.train), k, k,
                )  # fmt: skip
        else:
            result = train_dp(model, data.train, spec, asked, **common)
        dp = ConfigRecord({**result.applied.to_config(), "tenant": data.tenant})
        arrays = ArrayRecord({k: v.cpu() for k, v in model_state(model).items()})
        content = RecordDict({"arrays": arrays, "dp": dp})
        if evaluation is not None and before is not None:
            # Personalization: the global model and the fine-tuned one on the same held-out
            # split (never trained on), released as noised counts under ``evaluation``.
            released, exact = _release(
                {"global": before, "personal": model}, data, spec, evaluation, device, secure
            )
            for key in released:
                content[key] = released[key]
            _keep_locally(context, extra, data.tenant, msg.metadata.run_id, exact)
        return Message(content, reply_to=msg)

    @app.evaluate()
    @coded_errors
    def evaluate_(msg: Message, context: Context) -> Message:
        config = msg.content["config"]
        spec = ModelSpec.from_json(str(config["spec"]))  # type: ignore[index]
        data = _node_data(context, spec.labels, extra)
        k = _user_bound({**dict(context.run_config), **extra})
        evaluation = _eval_params(config, float(k or 1))
        if evaluation is None:
            raise ClientRefusal("no-evaluation-release")
        if config.get("tenant", data.tenant) != data.tenant:  # type: ignore[union-attr]
            raise ClientRefusal("wrong-tenant")
        device = pick_device(str(context.node_config.get("device", "auto")))
        secure = bool(config.get("secure-mode", True))  # type: ignore[union-attr]
        released, exact = _release(
            {"global": _model_from(msg, spec)}, data, spec, evaluation, device, secure
        )
        _keep_locally(context, extra, data.tenant, msg.metadata.run_id, exact)
        return Message(released, reply_to=msg)

    return app


app = make_client_app()
