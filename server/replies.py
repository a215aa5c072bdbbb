"""What makes a node's reply usable: the DP parameters it applied must be the ones asked,
its evaluation a checked DP release, its failure a code (never free text)."""

from __future__ import annotations

from flwr.app import Message, RecordDict

from privacy.params import DPParams
from privacy.protocol import error_name
from privacy.uncertainty import released_uncertainty
from server.planning import TenantPlan

# Config prefix of the evaluation release's DP parameters (training uses the default "dp-").
EVAL_PREFIX = "eval-dp-"

# A tenant's released evaluation: model ("global", "personal") -> DP-released figures
Released = dict[str, dict[str, float]]


def reply_failure(msg: Message) -> str:
    """A node's error as its code name: never the free text a reply may carry."""
    return error_name(msg.error.code, msg.error.reason)


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


def read_evaluation(
    content: RecordDict, plan: TenantPlan, models: tuple[str, ...]
) -> Released | str:
    """The released metrics of each of ``models`` (from noised counts, each with its SD and
    95% interval: ``privacy.uncertainty.released_uncertainty``), or why the reply cannot be
    used."""
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
            # The released figures with their uncertainty under the known noise.
            out[name] = released_uncertainty(
                [float(c) for c in counts], classes, plan.eval_params.noise_multiplier
            )
        except ValueError as exc:
            return str(exc)
    return out
